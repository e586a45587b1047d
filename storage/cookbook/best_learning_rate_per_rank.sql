-- Best learning rate per LoRA rank, each at its best checkpoint, by the concept score at LoRA weight 1 (any metric works).
SELECT r.rank, r.learning_rate, i.checkpoint_step, round(avg(m.value), 3) AS mean_concept_score, count(*) AS images
FROM image_metrics AS m JOIN images AS i USING (image_id) JOIN runs AS r USING (run_id)
WHERE m.metric = 'concept_score' AND i.lora_weight = 1.0
GROUP BY r.rank, r.learning_rate, i.checkpoint_step
QUALIFY row_number() OVER (PARTITION BY r.rank ORDER BY avg(m.value) DESC) = 1
ORDER BY r.rank;
