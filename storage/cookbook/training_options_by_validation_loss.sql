-- Each run's training options beside its best held-out validation loss (NULL without validation_images).
SELECT r.run_id, r.rank, r.target_preset, r.lr_scheduler, r.effective_batch_size, r.mixed_precision,
       r.min_snr_gamma, r.noise_offset, r.train_text_encoder, round(min(c.validation_loss), 4) AS best_validation_loss
FROM runs AS r LEFT JOIN checkpoints AS c USING (run_id)
WHERE r.status = 'completed'
GROUP BY ALL
ORDER BY best_validation_loss NULLS LAST, r.run_id;
