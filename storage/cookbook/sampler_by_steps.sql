-- Sampler x step count at LoRA weight 0.8: mean drift from the no-LoRA image and mean render time.
SELECT sampler, steps, round(avg(m.value), 3) AS mean_ssim_vs_baseline,
       round(avg(i.render_s) * 1000, 1) AS mean_render_ms, count(*) AS images
FROM images AS i JOIN image_metrics AS m USING (image_id)
WHERE i.lora_weight = 0.8 AND m.metric = 'ssim_vs_baseline'
GROUP BY sampler, steps
ORDER BY sampler, steps;
