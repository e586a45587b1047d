-- One row per training run: its settings, status, speed and final smoothed loss.
SELECT r.run_id, r.base_model, r.rank, r.alpha, r.learning_rate, r.max_steps, r.status, r.error,
       r.steps_per_s, r.wall_time_s, r.peak_memory_mb, r.trainable_params,
       (SELECT count(*) FROM checkpoints AS c WHERE c.run_id = r.run_id) AS num_checkpoints,
       (SELECT avg(loss) FROM (SELECT loss FROM losses AS l WHERE l.run_id = r.run_id
                               ORDER BY step DESC LIMIT 20)) AS final_loss_smoothed
FROM runs AS r
