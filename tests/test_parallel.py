"""Teacher-forced windows on worker processes (minee/parallel.py): joblib's loky processes and a
real Dask cluster give the same files as the loop in one process, bit for bit; a worker that dies
is a clear error within a bounded time; workers refuse a model they cannot load again."""
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import minee
import weights_tool
from minee import analysis, parallel
from minee.loading import fingerprint
from minee.__main__ import main

ROOT = Path(__file__).resolve().parents[1]

ANALYZE = ["--max-tokens", "200", "--window", "50", "--gen-prompts", "0"]        # 4 windows of the tiny model
BOUND_S = 120                                                                    # a dead worker is reported by then


def analyze_cli(model_dir, out, *extra):
    return main(["analyze", "--model", str(model_dir), "--out", str(out), *ANALYZE, *extra])


@pytest.fixture(scope="module")
def serial(tiny_with_tokenizer, tmp_path_factory):
    """The tiny model's analysis computed in this process (--workers 1, the default)."""
    out = tmp_path_factory.mktemp("serial")
    assert analyze_cli(tiny_with_tokenizer, out, "--json") == 0
    return out


def assert_same_files(a, b):
    """analysis.json byte for byte, and every array of the teacher-forced table."""
    assert (a / "analysis.json").read_bytes() == (b / "analysis.json").read_bytes()
    with np.load(a / "teacher_forced.npz") as za, np.load(b / "teacher_forced.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            assert za[k].dtype == zb[k].dtype and np.array_equal(za[k], zb[k]), k


def test_analyze_smollm2_with_2_workers_writes_the_same_files(smollm2_dir, tmp_path):
    """First in the file: a loky worker that grows by more than 300 MB after its first task is
    replaced (when psutil is installed), so workers that had loaded a tiny model would load SmolLM2
    twice (slower, the same result)."""
    run = ["--max-tokens", "25", "--window", "12", "--gen-prompts", "0", "--json"]   # 2 windows
    for workers, out in (("1", tmp_path / "w1"), ("2", tmp_path / "w2")):
        assert main(["analyze", "--model", str(smollm2_dir), "--out", str(out), *run, "--workers", workers]) == 0
    assert_same_files(tmp_path / "w1", tmp_path / "w2")


def test_analyze_with_2_workers_writes_the_same_files(tiny_with_tokenizer, serial, tmp_path, capsys):
    assert analyze_cli(tiny_with_tokenizer, tmp_path, "--workers", "2") == 0
    assert_same_files(serial, tmp_path)
    bar = capsys.readouterr().err
    assert "teacher-forced: 100%" in bar and "4/4" in bar                # the bar counted every window


def test_shortcut_fit_and_train_gate_are_the_same_with_2_workers(tiny_with_tokenizer, tmp_path, capsys):
    model = minee.load(tiny_with_tokenizer)
    ids = analysis.corpus_ids(model.tokenizer, max_tokens=200)
    one = minee.shortcuts.fit(model, ids, window=16, progress=False)                   # 13 windows, 4 groups
    two = minee.shortcuts.fit(model, ids, window=16, progress=False, workers=2)
    assert np.array_equal(one.weight, two.weight) and np.array_equal(one.bias, two.bias)
    assert one.meta == two.meta
    gates = []
    for workers in ("1", "2"):
        gates.append(tmp_path / f"gate{workers}.json")
        assert main(["train-gate", "--model", str(tiny_with_tokenizer), "--out", str(gates[-1]), "--max-tokens",
                     "120", "--window", "30", "--workers", workers, "--json"]) == 0
    assert gates[0].read_bytes() == gates[1].read_bytes()


def test_analyze_through_a_dask_cluster_writes_the_same_files(tiny_with_tokenizer, serial, tmp_path):
    distributed = pytest.importorskip("distributed")             # requirements-test.txt installs it
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        assert analyze_cli(tiny_with_tokenizer, tmp_path, "--dask-scheduler", cluster.scheduler_address,
                           "--json") == 0
        loaded = client.run(lambda: [source for source, _ in parallel._loaded])        # address -> models
    assert_same_files(serial, tmp_path)
    assert str(tiny_with_tokenizer) in sum(loaded.values(), [])       # the windows ran on the cluster's workers


def cli_env(extra):
    """The environment of a CLI run in a fresh process: this one's, with `extra`, importing this checkout."""
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_cli_killing_window(args, hook_env, timeout=BOUND_S):
    """Run the CLI in a fresh process whose workers see `hook_env`; (return code, stderr, seconds)."""
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "minee", *args], env=cli_env(hook_env), capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stderr, time.time() - start


def proc_stat(pid):
    """(state, parent pid) of a process, read from /proc, or None once it is gone."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]   # after "pid (name)"
    except (OSError, ValueError):
        return None
    return state, int(ppid)


def running(pid):
    """Whether pid is a process that has not ended (a zombie has ended)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def children(pid):
    """The pids of the running processes whose parent is pid."""
    stats = {int(p.name): proc_stat(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    return [c for c, stat in stats.items() if stat is not None and stat[1] == pid and stat[0] != "Z"]


def mapped_folders(pid):
    """The shared-copy folders (minee-workers-*) a process has files of memory-mapped."""
    try:
        return set(re.findall(r"\S*/minee-workers-[^/\s]+", Path(f"/proc/{pid}/maps").read_text()))
    except OSError:
        return set()


def test_ctrl_c_stops_the_workers(tiny_with_tokenizer, tmp_path):
    """SIGINT (Ctrl-C) once windows are done: exit code 130, one line, no worker left behind, and
    the temporary folder of the model the workers shared is removed."""
    p = subprocess.Popen([sys.executable, "-m", "minee", "analyze", "--model", str(tiny_with_tokenizer),
                          "--out", str(tmp_path), "--max-tokens", "4000", "--window", "50", "--gen-prompts", "0",
                          "--workers", "2"], stderr=subprocess.PIPE, env=cli_env({}))   # 80 windows
    seen = ""
    while not re.search(r" [1-9][0-9]*/80 ", seen):                   # the bar counts a finished window
        chunk = os.read(p.stderr.fileno(), 4096).decode(errors="replace")
        assert chunk, f"the run ended before it could be interrupted: {seen[-300:]}"
        seen += chunk
    workers = children(p.pid)
    assert len(workers) >= 2
    shared = set().union(*map(mapped_folders, workers))
    assert shared and all(Path(f).is_dir() for f in shared)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=BOUND_S)
    assert p.returncode == 130
    assert err.decode().strip().splitlines()[-1] == "minee: interrupted" and b"Traceback" not in err
    deadline = time.time() + 30
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if running(w)]
    assert not [f for f in shared if Path(f).exists()]


def test_a_killed_worker_is_a_clear_error_naming_the_window(tiny_with_tokenizer, tmp_path):
    code, err, seconds = run_cli_killing_window(
        ["analyze", "--model", str(tiny_with_tokenizer), "--out", str(tmp_path), *ANALYZE, "--workers", "2"],
        {parallel.KILL_HOOK: "2"})                              # the worker given window index 2 dies
    last = err.strip().splitlines()[-1]
    assert code == 2 and seconds < BOUND_S
    assert last.startswith("minee: error: a worker process died") and "window" in last and "positions" in last
    assert "Traceback" not in err


def test_a_killed_dask_worker_is_a_clear_error(tiny_with_tokenizer, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  env={parallel.KILL_HOOK: "2"}, silence_logs=50) as cluster:
        code, err, seconds = run_cli_killing_window(
            ["analyze", "--model", str(tiny_with_tokenizer), "--out", str(tmp_path), *ANALYZE,
             "--dask-scheduler", cluster.scheduler_address], {})
    last = err.strip().splitlines()[-1]
    assert code == 2 and seconds < BOUND_S
    assert last.startswith("minee: error: a worker process died") and "left the cluster" in last


def test_a_lost_dask_worker_stops_only_this_map(tiny_with_tokenizer):
    """In Python, inside dask_cluster(): the map stops with a WorkerError within the bound, and the
    futures the caller had on the same client before it are left alone."""
    distributed = pytest.importorskip("distributed")
    model = minee.load(tiny_with_tokenizer)
    ids = analysis.corpus_ids(model.tokenizer, max_tokens=200)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  env={parallel.KILL_HOOK: "2"}, silence_logs=50) as cluster:
        with parallel.dask_cluster(cluster.scheduler_address) as client:
            mine = client.submit(sum, [1, 2], pure=False)
            assert mine.result(timeout=BOUND_S) == 3                  # held in a worker's memory from now on
            start = time.time()
            with pytest.raises(parallel.WorkerError, match="Dask workers? at tcp://.* left the cluster.*window"):
                analysis.teacher_forced(model, ids, window=50, progress=False, workers=-1)
            assert time.time() - start < BOUND_S
            assert not mine.cancelled() and mine.result(timeout=BOUND_S) == 3


def test_one_worker_starts_no_process(tiny_with_tokenizer, monkeypatch):
    import joblib
    model = minee.load(tiny_with_tokenizer)
    ids = analysis.corpus_ids(model.tokenizer, max_tokens=40)
    monkeypatch.setattr(joblib, "Parallel", lambda *a, **k: pytest.fail("joblib was used"))
    analysis.teacher_forced(model, ids, window=16, progress=False)                     # workers=1
    with pytest.raises(pytest.fail.Exception, match="joblib was used"):
        analysis.teacher_forced(model, ids, window=16, progress=False, workers=2)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A random model whose tensors hold more than 512 values, so that an edit of their middle rows
    leaves the cheap fingerprint (256 values at each end) unchanged."""
    path = tmp_path_factory.mktemp("wide")
    weights_tool.make_random_model(path, layers=2, d_model=64, heads=4, kv_heads=2, ffn=128, vocab=96, seed=1)
    return path


WIDE_IDS = np.arange(70) % 96                                     # 5 windows of 16


def table(model, workers):
    """teacher_forced's table and perplexity as one dict of arrays."""
    tf, ppl = analysis.teacher_forced(model, WIDE_IDS, window=16, progress=False, workers=workers)
    return {"perplexity": np.array(ppl), **vars(tf)}


def assert_same_table(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def ablate(model):
    """Zero 20 middle rows of block 0's FFN output projection, in place (an ablation)."""
    model.params["model.layers.0.mlp.down_proj.weight"][20:40] = 0


def test_local_workers_compute_on_the_model_in_memory(wide_dir):
    """An edit in memory reaches the workers, also when loky reuses the processes of an earlier map
    that computed on the model before the edit; a model built in memory works too."""
    model = minee.load(wide_dir)
    before = table(model, workers=2)                              # the workers now hold the unedited model
    cheap = fingerprint(model)
    ablate(model)
    assert fingerprint(model) == cheap                            # the edit the old check could not see
    edited = table(model, workers=1)
    assert not np.array_equal(edited["kl"], before["kl"])         # the edit matters
    assert_same_table(table(model, workers=2), edited)
    in_memory = minee.Model(model.config, {k: v.copy() for k, v in model.params.items()})   # source None
    in_memory.params["model.layers.1.self_attn.o_proj.weight"][30:34] *= -3
    assert_same_table(table(in_memory, workers=2), table(in_memory, workers=1))


def where_embedding_is(model, begin, start, end):
    """A window's result: the file the worker's embedding is memory-mapped from."""
    return model.embed_tokens.filename


def fail_on_second_window(model, begin, start, end):
    if begin > 0:
        raise ArithmeticError("window failed")
    return 0


def test_local_workers_share_one_temporary_copy(wide_dir, tmp_path, monkeypatch):
    """The model is written once into the first root with room, memory-mapped by the workers, and
    removed after the map, after an error too."""
    model = minee.load(wide_dir)
    spans = minee.lens.windows(60, 16, 0)
    monkeypatch.setattr(parallel, "SHARED_ROOTS", (str(tmp_path / "missing"), str(tmp_path)))
    files = list(parallel.map_windows(where_embedding_is, model, spans, workers=2, progress=False))
    assert len(set(files)) == 1 and Path(files[0]).parent.parent == tmp_path
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArithmeticError, match="window failed"):
        list(parallel.map_windows(fail_on_second_window, model, spans, workers=2, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_no_room_for_the_shared_copy_is_a_clear_error(wide_dir, tmp_path, monkeypatch):
    model = minee.load(wide_dir)
    monkeypatch.setattr(parallel, "SHARED_ROOTS", (str(tmp_path),))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))     # bytes
    with pytest.raises(OSError, match=r"needs 0.3 MB; none of .* has that much free space.*TMPDIR.*workers=1"):
        table(model, workers=2)


def test_the_full_fingerprint_sees_every_value_and_the_config(wide_dir):
    model = minee.load(wide_dir)
    full = fingerprint(model, every_value=True)
    ablate(model)
    assert fingerprint(model, every_value=True) != full
    again = minee.load(wide_dir)
    assert fingerprint(again, every_value=True) == full
    again.config = dataclasses.replace(again.config, rope_theta=again.config.rope_theta * 2)
    assert fingerprint(again, every_value=True) != full


def test_a_dask_cluster_refuses_a_model_its_workers_cannot_load(wide_dir, tmp_path):
    """Dask workers load the model from its source: an edit in memory, a model built in memory and
    a directory that changed since the model was loaded are clear errors, not other results."""
    distributed = pytest.importorskip("distributed")
    model = minee.load(wide_dir)
    changed = tmp_path / "changed"
    weights_tool.make_random_model(changed, layers=2, d_model=16, heads=2, kv_heads=1, ffn=32, vocab=96, seed=1)
    loaded = minee.load(changed)
    weights_tool.make_random_model(changed, layers=2, d_model=16, heads=2, kv_heads=1, ffn=32, vocab=96, seed=2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster, parallel.dask_cluster(cluster.scheduler_address):
        assert_same_table(table(model, workers=-1), table(model, workers=1))
        ablate(model)
        with pytest.raises(ValueError, match="edited in memory, and edits made in memory cannot reach a Dask "
                                             "cluster.*workers=N.*or with workers=1"):
            table(model, workers=-1)
        with pytest.raises(ValueError, match="built in memory.*minee.load.*workers=N outside dask_cluster"):
            table(minee.Model(model.config, model.params), workers=-1)
        with pytest.raises(ValueError, match="found another model at that path: give every worker the same"):
            analysis.teacher_forced(loaded, WIDE_IDS, window=16, progress=False, workers=-1)


@pytest.mark.parametrize("workers", [0, -2, 1.5, True, np.float64(2)])
def test_bad_worker_counts_are_refused(tiny_with_tokenizer, workers):
    model = minee.load(tiny_with_tokenizer)
    with pytest.raises(ValueError, match="workers must be a whole number >= 1, or -1"):
        analysis.teacher_forced(model, np.arange(40), window=16, progress=False, workers=workers)


def test_numpy_integer_worker_counts_are_accepted(wide_dir):
    model = minee.load(wide_dir)
    assert_same_table(table(model, workers=np.int64(2)), table(model, workers=np.int32(1)))


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be >= 1, or -1"),
    (["--workers", "2", "--dask-scheduler", "tcp://127.0.0.1:1"], "leave --workers out"),
])
def test_cli_worker_errors_are_one_line(tiny_with_tokenizer, tmp_path, capsys, args, message):
    assert analyze_cli(tiny_with_tokenizer, tmp_path / "out", *args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()                         # refused before anything was done


def test_dask_scheduler_without_dask_installed_names_the_extra(tiny_with_tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)          # as if `pip install minee[dask]` was not run
    assert analyze_cli(tiny_with_tokenizer, tmp_path, "--dask-scheduler", "tcp://127.0.0.1:1") == 2
    assert "pip install minee[dask]" in capsys.readouterr().err
