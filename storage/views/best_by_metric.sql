-- The best LoRA checkpoint for each metric: mean over all its rendered LoRA images (weight != 0),
-- ranked in the metric's own direction. Links the LoRA files.
WITH per_checkpoint AS (
    SELECT m.metric, bool_and(m.higher_is_better) AS higher_is_better, i.base_model, i.run_id, i.rank,
           i.checkpoint_step, i.checkpoint_id, avg(m.value) AS mean_value, count(*) AS images
    FROM image_metrics AS m
    JOIN images AS i USING (image_id)
    WHERE i.checkpoint_id IS NOT NULL
    GROUP BY m.metric, i.base_model, i.run_id, i.rank, i.checkpoint_step, i.checkpoint_id
), ranked AS (
    SELECT *, row_number() OVER (
        PARTITION BY metric
        ORDER BY CASE WHEN higher_is_better THEN -mean_value ELSE mean_value END, checkpoint_id) AS place
    FROM per_checkpoint
)
SELECT r.metric, r.higher_is_better, r.base_model, r.rank, r.checkpoint_step, r.mean_value, r.images,
       r.run_id, r.checkpoint_id, c.kohya_path, c.lora_path
FROM ranked AS r
LEFT JOIN checkpoints AS c USING (checkpoint_id)
WHERE r.place = 1
ORDER BY r.metric
