"""Prefect flows: thin wrappers over medgen library calls. Tasks pass paths, never volumes."""

import os as _os

# Offline by default: Prefect's server analytics try to reach the network and print an error
# when they cannot (a hospital data flow has no business phoning home). Set it to true to opt in.
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
