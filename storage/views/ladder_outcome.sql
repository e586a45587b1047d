-- One row per run of an adaptive sweep ([search] strategy = "halving"): the last rung it reached, the
-- decision there and the evidence (metric, value, place among how many), the steps it trained against the
-- steps the full grid gives it (max_steps). Best first, then by how far each run got. Empty for a grid sweep.
WITH latest AS (
    SELECT *, row_number() OVER (PARTITION BY run_id ORDER BY rung DESC) AS newest FROM ladder
)
SELECT l.run_id, r.base_model, r.rank, r.learning_rate, r.variant, r.dataset_name, l.rung, l.decision,
       l.metric, l.value, l.higher_is_better, l.place, l.competitors,
       l.step AS steps_trained, r.max_steps AS grid_steps
FROM latest AS l
LEFT JOIN runs AS r USING (run_id)
WHERE l.newest = 1
ORDER BY l.rung DESC, l.place NULLS LAST, l.run_id
