"""Dividing the machine between worker processes.

torch (and the BLAS under numpy) start one thread per core in every process. Two or three such
processes on 2 cores ran each training step 13x slower than one alone (measured on this project's
CI machine), so whatever fans work out to processes (Dask workers, process pools) gives each its
share of the cores instead: cores // workers, at least 1.
"""

from __future__ import annotations

import os

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cores() -> int:
    """Cores this process may use (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share(workers: int, total: int | None = None) -> int:
    return max(1, (total or cores()) // max(1, workers))


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a worker process: read by OpenMP/MKL/OpenBLAS and by torch at start-up."""
    return {v: str(threads) for v in THREAD_VARS}


def limit_threads(threads: int) -> None:
    """In a running worker: set the env (for libraries not yet loaded) and torch's pools if loaded."""
    os.environ.update(thread_env(threads))
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
