-- Loss curve per run, raw and smoothed over a 20-step window.
SELECT run_id, step, loss,
       avg(loss) OVER (PARTITION BY run_id ORDER BY step ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS loss_smoothed
FROM losses
ORDER BY run_id, step;
