-- Best checkpoint per LoRA rank by a metric (here the demo world's concept score; any metric works).
SELECT base_model, rank, checkpoint_step, round(avg(m.value), 3) AS mean_concept_score, count(*) AS images
FROM image_metrics AS m JOIN images AS i USING (image_id)
WHERE m.metric = 'concept_score' AND i.checkpoint_id IS NOT NULL
GROUP BY base_model, rank, checkpoint_step
QUALIFY row_number() OVER (PARTITION BY base_model, rank ORDER BY avg(m.value) DESC) = 1
ORDER BY base_model, rank;
