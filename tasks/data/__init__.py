"""Training data: `sources.load_items` reads a dataset (sidecar captions, kohya repeat folders,
metadata.jsonl, CSV) into `dataset.DatasetItem`s; `captions` edits captions per step and captions
images with BLIP; `demo_world` draws the builtin demo dataset."""
