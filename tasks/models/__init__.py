"""Base models: `base_model.load_pipeline` (a diffusers folder or a single .safetensors file with its
config folder, SD1.x or SDXL, offline) and `validate_base_model`; the tiny builtin models
(`tiny_sd15`, `tiny_sdxl`), `single_file` conversion, `text_conditioning` for the UNet, and the
offline asset builders (`pretrain_tiny`, `build_clip_tokenizer`)."""
