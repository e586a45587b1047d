"""LoRA files: `files` names a checkpoint folder's files (no torch), `export.save_checkpoint` writes
one in the diffusers/peft and kohya formats, `kohya_metadata` its ss_* fields, `compatibility`
checks that a LoRA file can be used and fits a base model."""
