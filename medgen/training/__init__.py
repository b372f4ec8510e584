"""The shared training loop (checkpoints, resume, DDP, AMP) that every training stage builds on."""
