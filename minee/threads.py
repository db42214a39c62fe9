"""BLAS threads: one deliberate setting for all of minee's matrix products.

Decoding a token is a chain of matrix-vector products limited by memory bandwidth. On small
machines that other processes share, a second BLAS thread often makes them 5-15x slower and
erratic (measured here: SmolLM2 decode at 0.8 tokens/s with 2 threads vs 12-14 with 1 while
the other core was busy). So minee.load() sets BLAS to MINEE_THREADS threads (default 1)
unless set_threads() was called first; large teacher-forced runs can ask for more.
"""
import os

from threadpoolctl import threadpool_info, threadpool_limits

_chosen = None


def set_threads(n):
    """Use n BLAS threads for every NumPy matrix product from now on (process-wide)."""
    global _chosen
    if int(n) < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    threadpool_limits(int(n))
    _chosen = int(n)


def get_threads():
    """BLAS threads NumPy uses now (the first BLAS library threadpoolctl finds)."""
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    return blas[0]["num_threads"] if blas else None


def default_threads():
    """MINEE_THREADS if set, else 1."""
    value = os.environ.get("MINEE_THREADS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MINEE_THREADS must be a whole number >= 1, got {value!r}")
    return int(value)


def ensure_threads():
    """Apply the default (MINEE_THREADS, else 1) unless the user already chose."""
    if _chosen is None:
        set_threads(default_threads())
