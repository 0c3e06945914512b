"""Training: optimizers, pure train/eval steps, checkpoints, decoding, metrics and the training loop."""
