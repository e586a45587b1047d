-- How a metric moves with the learning rate at each checkpoint (LoRA images only; weight 1).
SELECT r.learning_rate, i.checkpoint_step, round(avg(m.value), 3) AS mean_concept_score,
       round(stddev_samp(m.value), 3) AS spread, count(*) AS images
FROM image_metrics AS m JOIN images AS i USING (image_id) JOIN runs AS r USING (run_id)
WHERE m.metric = 'concept_score' AND i.lora_weight = 1.0
GROUP BY r.learning_rate, i.checkpoint_step
ORDER BY r.learning_rate, i.checkpoint_step;
