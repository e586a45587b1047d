"""The sweep layer, free of torch: what a sweep is and which work it implies.

Public face: `load.load_spec` / `load.parse_spec` (TOML -> `spec.SweepSpec`, every problem at once),
`plan.training_runs` / `plan.render_jobs` / `cells.grid_cells` (the work, each piece with a content
id), `ids` (content ids and the rule for adding options without moving old ids), `hashes` (file
hashes, A1111's and kohya's too), `sampler_names` (the A1111 sampler registry), `claims` (file locks
that keep one worker on each piece of shared work and tell a dead holder from a live one).
"""
