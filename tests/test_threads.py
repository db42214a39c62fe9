"""BLAS threads are a deliberate, visible setting."""
import pytest
from threadpoolctl import threadpool_limits

import minee
from minee import threads


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
