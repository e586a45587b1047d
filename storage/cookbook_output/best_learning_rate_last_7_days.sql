-- In <output_dir>/catalog.duckdb: the best learning rate per rank in every sweep started in the last 7 days.
SELECT i.sweep_name, i.sweep_started_at, r.rank, r.learning_rate, round(avg(m.value), 3) AS mean_concept_score
FROM image_metrics AS m
JOIN images AS i USING (sweep_id, image_id)
JOIN runs AS r USING (sweep_id, run_id)
WHERE m.metric = 'concept_score' AND i.lora_weight = 1.0
  AND i.sweep_started_at >= now() - INTERVAL 7 DAY
GROUP BY i.sweep_name, i.sweep_id, i.sweep_started_at, r.rank, r.learning_rate
QUALIFY row_number() OVER (PARTITION BY i.sweep_id, r.rank ORDER BY avg(m.value) DESC) = 1
ORDER BY i.sweep_started_at, r.rank;
