"""One scoring job: `job.score_job` scores a render job's images; `metrics` is the registry of
per-image metrics over `image_features`, with optional CLIP scores and the demo's concept score."""
