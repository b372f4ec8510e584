"""Synthesis: the autoencoder and diffusion training stages (train_*), the sampler (volumes in memory,
`generate`) and synthesis run folders (runs, `synthesize`)."""
