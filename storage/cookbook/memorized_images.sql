-- Renders that copy a training image: nearest-training SSIM above the memorization threshold.
SELECT i.image_id, i.rank, i.checkpoint_step, i.lora_weight, i.seed, round(m.value, 3) AS nearest_training_ssim,
       m.reference_id AS training_image, i.path
FROM image_metrics AS m JOIN images AS i USING (image_id)
WHERE m.metric = 'nearest_training_ssim'
  AND i.image_id IN (SELECT image_id FROM image_metrics WHERE metric = 'memorized_flag' AND value = 1)
ORDER BY m.value DESC;
