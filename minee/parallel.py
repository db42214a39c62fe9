"""Teacher-forced work spread over processes, or machines: a map over windows with joblib.

A corpus is read in windows (lens.windows) that do not depend on each other, so the table
`analyze` builds, the features `train-gate` learns from and the sums the shortcut fit adds up are
each a map over windows followed by a concatenation or a sum. `map_windows` is that map:

- workers=1: a plain loop in this process (no joblib, no other process).
- workers=N: joblib hands the windows to N worker processes (its default backend, loky), or,
  inside `dask_cluster(address)` or `joblib.parallel_config(backend="dask")`, to the workers of a
  Dask cluster, which may live on other machines.

The workers compute on the model the caller holds, edits made in memory included, or refuse:

- Local workers (loky, or joblib's multiprocessing and threading backends): for every map the
  caller writes its model once into a temporary folder (on /dev/shm when it has room): the model
  object pickled, with every NumPy array in it saved beside it as a .npy file. Each worker rebuilds
  the model with those arrays memory-mapped, so all of them share one copy in memory, and keeps it
  for the map's later windows (loky reuses its processes from one map to the next: the folder,
  new for every map, is what they key it on). The folder is removed when the map ends, also on an
  error or Ctrl-C. A model built in memory works too.
- A Dask cluster: the workers, possibly on other machines, load the model themselves from its
  source (its directory, or a known name such as smollm2-135m), with 1 BLAS thread, and keep it.
  Each checks that its config and every byte of its weights hash to the caller's model's
  (loading.fingerprint(..., every_value=True)), so a model edited in memory, or another model at
  that path on another machine, is an error, never a silent difference.

Arguments shared by all windows (the token ids, shortcut maps) should be NumPy arrays: joblib
sends an array to the workers once (memory-mapped by loky, scattered by Dask), while anything else
travels with every window.

Results come back in window order, and each window is computed by the same code as in the loop,
so the output is the same, bit for bit, as long as the workers use the same BLAS kernel (another
CPU or BLAS can change float32 sums in their last bits).
"""
import functools
import operator
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
from concurrent.futures import BrokenExecutor, CancelledError
from contextlib import contextmanager
from pathlib import Path

import numpy as np

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
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or (workers < 1 and workers != -1):
        raise ValueError(f"workers must be a whole number >= 1, or -1 for every core; got {workers!r}")
    workers = int(workers)
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
    done = 0
    with _model_for_workers(model) as model_at, _stop_when_a_dask_worker_leaves() as gone:
        tasks = (delayed(_in_worker)(fn, model_at, i * group, g, *shared) for i, g in enumerate(groups))
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
                "later one; the windows before it were done. Check the workers' memory (each needs room for its "
                "windows, and on a Dask cluster for its own copy of the model) and run again, with fewer "
                "workers if memory is short") from None


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
    client = _dask_client()
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


def _dask_client():
    """The Dask client of joblib's active backend (dask_cluster, parallel_config(backend="dask")),
    or None for a backend whose workers run on this machine."""
    from joblib.parallel import get_active_backend
    return getattr(get_active_backend()[0], "client", None)              # only the Dask backend has one


@contextmanager
def _model_for_workers(model):
    """Where the workers find the model, as the arguments of _worker_model: with local workers,
    (a temporary folder holding this very model, None); with Dask, (its source, the hash of its
    config and weights) for the workers to load and check."""
    if _dask_client() is None:
        with _shared_copy(model) as folder:
            yield folder, None
    else:
        yield _worker_source(model), fingerprint(model, every_value=True)


SHARED_ROOTS = ("/dev/shm", None)      # where _shared_copy writes: the first with room (None: TMPDIR or /tmp)


@contextmanager
def _shared_copy(model):
    """A temporary folder holding the model for local workers: model.pkl, the model object
    pickled with each of its NumPy arrays saved beside it as N.npy (read by _read_shared_copy).
    Removed on exit, on an error or Ctrl-C too."""
    roots = [root or tempfile.gettempdir() for root in SHARED_ROOTS]
    size = sum(a.nbytes for a in model.params.values())
    root = next((r for r in roots if os.path.isdir(r) and shutil.disk_usage(r).free > 1.1 * size + 2**26), None)
    if root is None:
        raise OSError(f"worker processes share the model through a temporary folder, which needs {size / 1e6:,.1f} "
                      f"MB; none of {', '.join(roots)} has that much free space: free some, point TMPDIR at a "
                      "larger disk, or use workers=1")
    with tempfile.TemporaryDirectory(prefix="minee-workers-", dir=root) as folder:
        saved = {}                                                       # id(array) -> its file number

        def save_array(obj):
            if not isinstance(obj, np.ndarray) or obj.dtype.hasobject:
                return None                                              # pickled as usual
            if id(obj) not in saved:
                saved[id(obj)] = len(saved)
                np.save(Path(folder) / f"{saved[id(obj)]}.npy", obj)
            return saved[id(obj)]

        with open(Path(folder) / "model.pkl", "wb") as f:
            pickler = pickle.Pickler(f, protocol=pickle.HIGHEST_PROTOCOL)
            pickler.persistent_id = save_array
            pickler.dump(model)
        yield folder


def _read_shared_copy(folder):
    """The model _shared_copy wrote into folder, its arrays memory-mapped (read-only, shared by
    every process that maps them)."""
    mapped = {}                                                          # file number -> its array

    def load_array(n):
        if n not in mapped:
            mapped[n] = np.load(Path(folder) / f"{n}.npy", mmap_mode="r")
        return mapped[n]

    with open(Path(folder) / "model.pkl", "rb") as f:
        unpickler = pickle.Unpickler(f)
        unpickler.persistent_load = load_array
        return unpickler.load()


def _worker_source(model):
    """What a Dask worker loads: the model's directory as an absolute path, or its known name."""
    if model.source is None:
        raise ValueError("the workers of a Dask cluster load the model themselves from its directory, but this "
                         "model was built in memory (model.source is None): load it with minee.load(DIRECTORY), "
                         "or compute with worker processes on this machine (workers=N outside dask_cluster), "
                         "which compute on the model you hold")
    path = Path(model.source).expanduser()
    return str(path.resolve()) if path.exists() else str(model.source)


# ------------------------------------------------------------------ in the worker process

_loaded = {}                       # (source or folder, hash or None) -> the one model this process keeps
_loading = threading.Lock()        # a Dask worker may run several windows at once, in threads


def _in_worker(fn, model_at, first, group, *shared):
    """One group of windows, in a worker: the model is read on the first call and kept."""
    if os.environ.get(KILL_HOOK) == str(first):
        os.kill(os.getpid(), signal.SIGKILL)
    return _group_result(fn, _worker_model(*model_at), group, shared)


def _worker_model(where, expected):
    """The model a worker computes on, read once per map (local workers: expected is None, and
    `where` the folder of _shared_copy) or once per process (Dask: loaded from its source `where`
    and checked to hash to `expected`), with 1 BLAS thread."""
    with _loading:
        if (where, expected) not in _loaded:
            _loaded.clear()                                  # one model at a time
            set_threads(1)
            _loaded[where, expected] = _read_shared_copy(where) if expected is None else _load_checked(where, expected)
        return _loaded[where, expected]


def _load_checked(source, expected):
    """The model at `source`, refused unless its config and weights hash to `expected`."""
    model = load(source, progress=False)
    if fingerprint(model, every_value=True) != expected:
        import socket
        raise ValueError(f"the Dask worker on {socket.gethostname()} loaded {source}, but its config or weights "
                         "differ from those of the model being computed on. Either that model was edited in "
                         "memory, and edits made in memory cannot reach a Dask cluster (its workers load the model "
                         "from its source): compute with worker processes on this machine (workers=N, or --workers "
                         "N, without a Dask cluster), which see the edits, or with workers=1; or the worker found "
                         "another model at that path: give every worker the same model directory")
    return model


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
