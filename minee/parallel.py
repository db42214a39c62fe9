"""Teacher-forced work spread over processes, or machines: a map over windows with joblib.

A corpus is read in windows (lens.windows) that do not depend on each other, so the table
`analyze` builds, the features `train-gate` learns from and the sums the shortcut fit adds up are
each a map over windows followed by a concatenation or a sum. `map_windows` is that map:

- workers=1: a plain loop in this process (no joblib, no other process).
- workers=N: joblib hands the windows to N worker processes (its default backend, loky), or,
  inside `dask_cluster(address)` or `joblib.parallel_config(backend="dask")`, to the workers of a
  Dask cluster, which may live on other machines.

Workers are never sent the model. Each loads it once, from its source (its directory, or a known
name such as smollm2-135m), with 1 BLAS thread, checks that it is the same model (its
fingerprint), and keeps it for every window it is given. Arguments shared by all windows (the
token ids, shortcut maps) should be NumPy arrays: joblib sends an array to the workers once
(memory-mapped by loky, scattered by Dask), while anything else travels with every window.

Results come back in window order, and each window is computed by the same code as in the loop,
so the output is the same, bit for bit, as long as the workers use the same BLAS kernel (another
CPU or BLAS can change float32 sums in their last bits).
"""
import functools
import operator
import os
import signal
import sys
import threading
from concurrent.futures import BrokenExecutor, CancelledError
from contextlib import contextmanager
from pathlib import Path

from .loading import fingerprint, load
from .threads import set_threads

KILL_HOOK = "MINEE_TEST_KILL_WINDOW"     # tests only: the worker given this window index dies (SIGKILL)


class WorkerError(RuntimeError):
    """A worker process died (killed, out of memory, crashed) before its windows were done."""


def map_windows(fn, model, spans, *shared, workers=1, group=1, desc="windows", progress=True):
    """Yield fn(model, begin, start, end, *shared) for every window (begin, start, end) of spans, in order.

    group > 1: yield one result per `group` consecutive windows, their results added with `+`
    where the windows ran, so that only one sum per group travels back (the shortcut fit's sums
    are hundreds of MB). The groups are the same for any number of workers, so is the result.
    workers: processes to spread the windows over; -1 means every core (or every thread of the
    Dask cluster); 1 runs them here. The progress bar counts finished windows, in order.
    """
    if not isinstance(workers, int) or (workers < 1 and workers != -1):
        raise ValueError(f"workers must be a whole number >= 1, or -1 for every core; got {workers!r}")
    from tqdm.auto import tqdm
    groups = [spans[i:i + group] for i in range(0, len(spans), group)]
    n_jobs = 1 if workers == 1 else _n_jobs(workers, len(groups))
    if n_jobs <= 1:
        results = (_group_result(fn, model, g, shared) for g in groups)
    else:
        results = _on_workers(fn, model, groups, group, shared, n_jobs)
    with tqdm(total=len(spans), desc=desc, unit="window", disable=not progress) as bar:
        for g, result in zip(groups, results):
            bar.update(len(g))
            yield result


def _n_jobs(workers, n_groups):
    """How many workers to start: the backend's count for `workers`, no more than there is work for."""
    from joblib import effective_n_jobs
    return min(effective_n_jobs(workers), n_groups)


def _group_result(fn, model, group, shared):
    """The windows of one group computed one after another, their results added (one window: its result)."""
    return functools.reduce(operator.add, (fn(model, *span, *shared) for span in group))


def _on_workers(fn, model, groups, group, shared, n_jobs):
    """The groups' results from joblib workers, in order; a dead worker is a WorkerError."""
    from joblib import Parallel, delayed
    source, expected = _worker_source(model), fingerprint(model)
    tasks = (delayed(_in_worker)(fn, source, expected, i * group, g, *shared) for i, g in enumerate(groups))
    done = 0
    with _stop_when_a_dask_worker_leaves() as gone:
        try:
            for result in Parallel(n_jobs=n_jobs, return_as="generator")(tasks):
                done += 1
                yield result
        except _death_errors() as e:
            _, start, end = groups[done][0]                               # the first window not returned
            lost = gone()
            what = (f"the Dask worker{'s' * (len(lost) > 1)} at {', '.join(lost)} left the cluster" if lost
                    else type(e).__name__)
            raise WorkerError(
                f"a worker process died (killed, out of memory or crashed: {what}) while computing "
                f"window {done * group + 1} of {sum(map(len, groups))} (positions {start}..{end - 1}) or a "
                "later one; the windows before it were done. Each worker holds a copy of the model: check "
                "the workers' memory and run again, with fewer workers if memory is short") from None


def _death_errors():
    """Exceptions that mean a worker process died: loky's broken pool; with Dask (imported only
    when in use) a task that killed its workers, or lost the data joblib scattered to one."""
    dask = sys.modules.get("distributed")
    return (BrokenExecutor, CancelledError) + ((dask.KilledWorker,) if dask else ())


@contextmanager
def _stop_when_a_dask_worker_leaves(interval_s=1.0):
    """With joblib's Dask backend: as soon as a worker that was in the cluster at the start is gone,
    cancel the futures created since, so that joblib raises at once. Yields gone(): the sorted
    addresses of the workers that have left so far. With any other backend, does nothing (and
    gone() is always empty).

    Dask on its own retries a dead worker's tasks and recomputes the results it held, but seen
    through joblib that can wait forever (seen here: a result lost with its worker, recomputed,
    never delivered). A clear error within a second or two is better than a run that may hang;
    so keep the cluster's size fixed while windows run (an adaptive cluster scaling down counts
    as a lost worker too)."""
    from joblib.parallel import get_active_backend
    client = getattr(get_active_backend()[0], "client", None)             # only the Dask backend has one
    if client is None:
        yield lambda: []
        return
    ours_from = set(client.futures)                                       # the caller's own futures stay
    at_start = set(client.ncores())                                       # worker addresses

    def gone():
        try:
            return sorted(at_start - set(client.ncores()))
        except Exception:                                                 # the client is closing
            return []

    def watch():
        while not stop.wait(interval_s):
            if gone():
                from distributed import Future                            # a Dask client: it is installed
                client.cancel([Future(key, client) for key in set(client.futures) - ours_from])
                return
    stop = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True, name="minee-dask-watch")
    watcher.start()
    try:
        yield gone
    finally:
        stop.set()
        watcher.join()


def _worker_source(model):
    """What a worker loads: the model's directory as an absolute path, or its known name."""
    if model.source is None:
        raise ValueError("workers load the model themselves from its directory, but this model was "
                         "built in memory (model.source is None); load it with minee.load(DIRECTORY), "
                         "or use workers=1")
    path = Path(model.source).expanduser()
    return str(path.resolve()) if path.exists() else str(model.source)


# ------------------------------------------------------------------ in the worker process

_loaded = {}                       # (source, fingerprint) -> the one model this process keeps
_loading = threading.Lock()        # a Dask worker may run several windows at once, in threads


def _in_worker(fn, source, expected, first, group, *shared):
    """One group of windows, in a worker: the model is loaded on the first call and kept."""
    if os.environ.get(KILL_HOOK) == str(first):
        os.kill(os.getpid(), signal.SIGKILL)
    return _group_result(fn, _worker_model(source, expected), group, shared)


def _worker_model(source, expected):
    """The model at `source`, loaded once per process with 1 BLAS thread, checked to have the
    fingerprint `expected` (a worker on another machine may find another model at that path)."""
    with _loading:
        if (source, expected) not in _loaded:
            _loaded.clear()                                  # one model at a time
            set_threads(1)
            model = load(source, progress=False)
            if fingerprint(model) != expected:
                import socket
                raise ValueError(f"the worker on {socket.gethostname()} found another model at {source} "
                                 f"(fingerprint {fingerprint(model)}, expected {expected}); give every "
                                 "worker the same model directory")
            _loaded[source, expected] = model
        return _loaded[source, expected]


# ------------------------------------------------------------------ a Dask cluster

@contextmanager
def dask_cluster(address):
    """Within this block, map_windows sends its windows to the Dask cluster whose scheduler is at
    `address` (e.g. tcp://10.0.0.5:8786). Needs `pip install minee[dask]` here and on the workers,
    which must find the model at the same path (or, for a known name, in their own MINEE_CACHE)."""
    try:
        from distributed import Client
    except ImportError:
        raise RuntimeError("a Dask cluster needs dask.distributed: pip install minee[dask]") from None
    from joblib import parallel_config
    with Client(address, timeout="20s") as client, parallel_config(backend="dask"):
        yield client
