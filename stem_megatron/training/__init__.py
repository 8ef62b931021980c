"""Training: the loop on megatron-core schedules, LR schedules, logging, checkpoints."""
