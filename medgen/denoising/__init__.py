"""Denoising: the score-based denoiser (denoiser), its intensity normalisation (normalise), batch
denoising of scans (batch) and training of the score model (train)."""
