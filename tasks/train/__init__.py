"""One training run. `run.train_lora` trains, checkpoints and records a run (resuming a killed one);
`loop` is the training itself (`setup` -> `train_step` -> `train_loop`); `records` reads and writes
a run's rows (no torch); `child_process` and `remote` run it in a child process or on a worker;
`class_images.ensure_class_images` renders and caches prior preservation's class images."""
