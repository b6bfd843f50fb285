"""The FSDP trainer: config, checkpoints, the training loop."""
