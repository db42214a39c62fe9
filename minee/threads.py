"""BLAS threads: one deliberate setting for all of minee's matrix products.

Decoding a token is a chain of matrix-vector products limited by memory bandwidth. On small
machines that other processes share, a second BLAS thread often makes them 5-15x slower and
erratic (measured here: SmolLM2 decode at 0.8 tokens/s with 2 threads vs 12-14 with 1 while
the other core was busy). So minee.load() sets BLAS to MINEE_THREADS threads (default 1)
unless set_threads() was called first; large teacher-forced runs can ask for more.

minee.load() also maps OpenBLAS's packing buffer once per process (map_gemm_buffer, issue 21).
"""
import os

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

_chosen = None
_buffer_mapped = False


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


def map_gemm_buffer():
    """Run one GEMM, once per process, that makes OpenBLAS map the pages its later GEMMs prefetch into.

    With fewer rows than its block height (320-448) and one thread, OpenBLAS runs ops.linear's
    weight @ rows.T by packing the rows into the start of its 32 MB buffer and the weight, 12
    columns at a time, into the same 14 KB further on: those few pages are all such products ever
    write. Its kernels prefetch past both, into pages that stay unmapped, ~100,000 times per
    product. On an AMD EPYC VM such products ran 2-3x slower until another product had mapped
    those pages (issue 21; that the prefetches are the cost there is inferred, not measured; on
    Intel they are free). This product packs whole 448 x 448 blocks of a 1024 x 1024 weight and
    64 x 448 floats of rows, writing every page those prefetches reach (bench/README.md). It took
    0.1 s in a fresh process on the project's VM, mostly mapping fresh memory.
    """
    global _buffer_mapped
    if not _buffer_mapped:
        with threadpool_limits(1):                           # the buffer of single-threaded GEMMs
            np.ones((64, 1024), np.float32) @ np.ones((1024, 1024), np.float32).T
        _buffer_mapped = True
