"""Prefect flows: thin wrappers over medgen library calls. Tasks pass paths, never volumes."""
