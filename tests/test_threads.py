"""BLAS threads are a deliberate, visible setting; minee.load maps OpenBLAS's packing buffer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import minee
from minee import loading, threads


def test_set_and_get_threads():
    with threadpool_limits(limits=None):                      # restore whatever was there afterwards
        minee.set_threads(1)
        assert minee.get_threads() == 1
    with pytest.raises(ValueError, match=">= 1"):
        minee.set_threads(0)


def test_default_comes_from_minee_threads(monkeypatch):
    monkeypatch.delenv("MINEE_THREADS", raising=False)
    assert threads.default_threads() == 1
    monkeypatch.setenv("MINEE_THREADS", "2")
    assert threads.default_threads() == 2
    monkeypatch.setenv("MINEE_THREADS", "two")
    with pytest.raises(ValueError, match="MINEE_THREADS must be a whole number"):
        threads.default_threads()


def test_load_applies_the_default_only_if_nobody_chose(monkeypatch, tmp_path):
    import weights_tool
    weights_tool.make_random_model(tmp_path)
    calls = []
    monkeypatch.setattr(threads, "set_threads", calls.append)
    monkeypatch.setattr(threads, "_chosen", None)
    monkeypatch.setenv("MINEE_THREADS", "1")
    minee.load(tmp_path)
    assert calls == [1]
    monkeypatch.setattr(threads, "_chosen", 2)                # the user called set_threads(2) before
    minee.load(tmp_path)
    assert calls == [1]


MAPPED_AFTER_WARM_UP = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
from minee import ops, threads
threadpool_limits(1)

def mapped_kb():    # Rss of the anonymous read-write mappings of 32 MiB or more: OpenBLAS's buffers
    kb, big = 0, False
    for line in open("/proc/self/smaps"):
        f = line.split()
        if "-" in f[0] and not f[0].endswith(":"):
            a, b = (int(v, 16) for v in f[0].split("-"))
            big = b - a >= 32 << 20 and f[1] == "rw-p" and len(f) == 5
        elif big and f[0] == "Rss:":
            kb += int(f[1])
    return kb

if sys.argv[1] == "warm":
    threads.map_gemm_buffer()
before = mapped_kb()
rng = np.random.default_rng(0)
for out, k in ((576, 576), (192, 576), (1536, 576), (576, 1536)):       # SmolLM2's weight shapes
    w = rng.standard_normal((out, k)).astype(np.float32)
    for m in (ops.GEMM_MIN_ROWS, 16, 64, 128, 320):                  # up to OpenBLAS's block height
        ops.linear(rng.standard_normal((m, k)).astype(np.float32), w)
print(json.dumps([before, mapped_kb()]))
"""


def mapped_kb_before_after(kernel, mode):
    env = dict(os.environ, OPENBLAS_CORETYPE=kernel, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run([sys.executable, "-c", MAPPED_AFTER_WARM_UP, mode], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("kernel", ["SkylakeX", "Haswell"])
def test_after_the_warm_up_small_gemms_map_no_new_page_of_the_blas_buffer(kernel):
    """Issue 21: with 4 rows up to OpenBLAS's block height (320-448), ops.linear's GEMM only ever
    writes a few pages of OpenBLAS's buffer and its kernels prefetch past them; threads.map_gemm_buffer (run by
    minee.load) must map all of them first. In a fresh process (1 thread, the kernel OpenBLAS
    picks on AVX-512 and on AVX2 CPUs): after it, those products map no new page of the buffer;
    without it, they do (the check can fail)."""
    if "openblas" not in json.dumps(threadpool_info()).lower():
        pytest.skip("the packing buffer checked here is OpenBLAS's")
    before, after = mapped_kb_before_after(kernel, "warm")
    assert before > 0 and after == before
    cold_before, cold_after = mapped_kb_before_after(kernel, "cold")
    assert cold_after > cold_before


def test_load_maps_the_gemm_buffer(monkeypatch, tmp_path):
    import weights_tool
    weights_tool.make_random_model(tmp_path)
    calls = []
    monkeypatch.setattr(loading, "map_gemm_buffer", lambda: calls.append(1))
    minee.load(tmp_path)
    assert calls == [1]
