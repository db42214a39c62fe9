"""Runs the cases of test_fuzz.py: one process caps its address space once, then forks a child
per case, so a case costs milliseconds instead of a fresh Python, and a crash or a hang in one
case is caught and blamed on that case alone.

    python tests/fuzz_worker.py LIMIT_BYTES < cases.jsonl > outcomes.jsonl

Each input line is {"id", "path"} (load a model directory), {"id", "gguf", "path"} (convert the
GGUF into path, then load it) or {"id", "template"} (render a chat template), with an optional
"seconds" (the case's time limit, default SECONDS_PER_CASE). Each output line is {"id", "outcome",
"detail"}: outcome is "loaded" (finite logits), "rendered", the name of the error class raised,
or a failure starting "FAIL".
"""
import json
import os
import resource
import signal
import sys

import gguf  # noqa: F401  (minee imports it when it first reads a GGUF: here once, not in every child)
import numpy as np

import minee
import minee.tokenizer
from minee.convert import gguf_to_hf

SECONDS_PER_CASE = 30          # a hang is a failure too
TEMPLATE_SECONDS = 0.25        # a template's time budget here (minee's own is 2 s), so the fuzz stays short


def run_case(case):
    """(outcome, detail) of one case; runs in the forked child."""
    try:
        if "template" in case:
            minee.tokenizer.render_chat_template(case["template"], "fuzz.jinja", bos_token="<s>", eos_token="</s>",
                                                 messages=[{"role": "user", "content": "hi"}],
                                                 add_generation_prompt=True)
            return "rendered", ""
        if "gguf" in case:
            gguf_to_hf(case["gguf"], case["path"], progress=False)
        model = minee.load(case["path"], progress=False)
        logits = model.forward(np.arange(8) % model.config.vocab_size)               # (1, 8, V)
    except (ValueError, OSError) as e:       # minee's own errors are ValueErrors; the test says which may occur
        return type(e).__name__, str(e)
    except BaseException as e:
        return "FAIL other exception", f"{type(e).__name__}: {e}"
    if logits.dtype != np.float32 or not np.isfinite(logits).all():
        return "FAIL non-finite logits", f"{logits.dtype}, {np.isnan(logits).sum()} NaN"
    return "loaded", ""


def run_forked(case):
    """run_case in a child process; a child that dies without answering is a crash, one that runs
    out of its time a hang."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                         # the child
        os.close(read_end)
        signal.alarm(case.get("seconds", SECONDS_PER_CASE))
        outcome, detail = run_case(case)
        os.write(write_end, json.dumps([outcome, detail[:400]]).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read()
    _, status = os.waitpid(pid, 0)
    if answer:
        return json.loads(answer)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        return ["FAIL hang", f"over {case.get('seconds', SECONDS_PER_CASE)} s"]
    how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
           else f"exit code {os.WEXITSTATUS(status)}")
    return ["FAIL crash", how]


def main():
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    minee.set_threads(1)
    minee.tokenizer.TEMPLATE_SECONDS = TEMPLATE_SECONDS
    for line in sys.stdin:
        case = json.loads(line)
        outcome, detail = run_forked(case)
        print(json.dumps({"id": case["id"], "outcome": outcome, "detail": detail}), flush=True)


if __name__ == "__main__":
    main()
