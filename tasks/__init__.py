"""The work of a sweep, one package per stage (see docs/architecture.md):

sweep/   spec, plan and ids; no torch, so flows import it
data/    datasets: sources, captions, the demo world
models/  base models: loading, tiny builtins, single-file conversion, text conditioning
lora/    LoRA checkpoint files: export formats, kohya metadata, compatibility checks
train/   one training run: records, runners, and the loop (setup -> step -> loop)
render/  one render job: samplers, PNG metadata, grid images
score/   one scoring job: metrics, CLIP and concept scores
preflight.py      every input checked before any work; prefect_tasks.py: the only @task wrappers
"""
