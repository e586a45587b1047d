"""One render job: `job.render_job` renders a checkpoint's grid (samplers x steps x LoRA weights x
prompts x seeds) with the pipeline loaded once; `samplers` builds schedulers, `png_metadata` writes
A1111 infotext, `grid_image` the labelled X/Y plots."""
