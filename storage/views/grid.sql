-- The full comparison grid: every (base model, rank, checkpoint, sampler, steps, CFG, LoRA weight,
-- prompt, seed) cell. Weight 0.0 is the base model without the LoRA, rendered once per base model
-- (the baseline) and shown in every checkpoint's row, since weight 0 equals no LoRA exactly.
SELECT image_id, base_model, run_id, checkpoint_id, rank, checkpoint_step, sampler, steps,
       lora_weight, cfg_scale, prompt_index, prompt, negative_prompt, seed, width, height, path,
       render_s, extra_loras, false AS is_baseline
FROM images
WHERE checkpoint_id IS NOT NULL
UNION ALL
SELECT b.image_id, b.base_model, c.run_id, c.checkpoint_id, r.rank, c.step AS checkpoint_step,
       b.sampler, b.steps, 0.0 AS lora_weight, b.cfg_scale, b.prompt_index, b.prompt, b.negative_prompt,
       b.seed, b.width, b.height, b.path, b.render_s, b.extra_loras, true AS is_baseline
FROM images AS b
JOIN runs AS r ON r.base_model = b.base_model
JOIN checkpoints AS c ON c.run_id = r.run_id
WHERE b.checkpoint_id IS NULL AND (SELECT zero_weight_in_grid FROM catalog_info)
