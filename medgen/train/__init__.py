"""Training: the shared loop (loop.py) and the stages built on it (autoencoder.py, ldm.py)."""
