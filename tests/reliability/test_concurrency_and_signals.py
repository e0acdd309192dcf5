"""Two runs on one output, and signals at the moments that matter: while importing, inside the commit."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, load_folder

from .util import STAGING_MARK, assert_error, leftovers, run_cli_many, task_arithmetic, write_models

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
BUSY = "is writing this output folder now; wait for it to finish or choose another --out"

# Holds the output's lock the way a merge does, says so, and waits to be killed.
HOLD_LOCK = """
import sys, time
from pathlib import Path
from weightweaving.checkpoints.writer import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def _assert_is(out, want) -> None:
    got = load_folder(out)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_second_run_on_a_busy_output_stops_and_a_killed_one_never_blocks(tmp_path):
    b, ms, base, tuned = write_models(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        merge = ["merge", "--base", b, "--models", *ms, "--lambda", "0.5", "--out", out]
        res = run_cli_many({"busy": merge, "busy_overwrite": [*merge, "--overwrite"]}, workers=1)
        for case in res.values():
            assert_error(case, f"{out}: another weightweaving run (pid {holder.pid}) {BUSY}")
        assert not out.exists() and leftovers(tmp_path) == [".out.weightweaving-lock"]  # the holder's
    finally:
        holder.kill()  # kill -9: the lock dies with it
        holder.wait()
    # what dead runs leave behind: a complete-looking staging folder (of a PID that is alive: 1) and a
    # folder moved aside by an --overwrite commit; neither is taken for an existing output
    for name in (f".out{STAGING_MARK}1-deadbeef", f".out{STAGING_MARK}{holder.pid}-cafe0000-old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b.read_bytes())
    res = run_cli_many({"after": merge})["after"]
    assert res.returncode == 0 and res.stderr == "", res.stderr
    _assert_is(out, task_arithmetic(base, tuned, 0.5))
    assert leftovers(tmp_path) == []


def test_two_merges_at_once_never_mix(tmp_path):
    """Started together on one output: each completes or stops with the one line; the result is one of them."""
    b, ms, base, tuned = write_models(tmp_path)
    out = tmp_path / "out"
    wants = {lam: task_arithmetic(base, tuned, lam) for lam in (0.25, 0.75)}
    for _ in range(3):
        cases = {
            lam: ["merge", "--base", b, "--models", *ms, "--lambda", lam, "--out", out, "--overwrite"]
            for lam in wants
        }
        res = run_cli_many(cases, workers=2)
        assert any(r.returncode == 0 for r in res.values())
        for r in res.values():
            if r.returncode != 0:
                assert "another weightweaving run" in r.stderr and BUSY in r.stderr, r.stderr
                assert_error(r, r.stderr.strip().removeprefix("error: "))
        got = load_folder(out)
        assert any(all(torch.equal(got[k], want[k]) for k in want) for want in wants.values())
        assert leftovers(tmp_path) == []


# The real CLI with a signal sent to itself at the worst moment of an --overwrite commit: after the old
# output was moved aside, before the new one is renamed in.
SIGNAL_IN_COMMIT = """
import os, signal, sys
sig, out = int(sys.argv[1]), os.path.abspath(sys.argv[2])
real_rename = os.rename
def rename(src, dst):
    if os.path.abspath(src) == out:
        real_rename(src, dst)
        os.kill(os.getpid(), sig)
        return
    real_rename(src, dst)
os.rename = rename
from weightweaving.cli import main
sys.exit(main(sys.argv[3:]))
"""

# ... and while the staging folder of an interrupted run is being removed (a second Ctrl-C).
SIGNAL_IN_ABORT = """
import os, shutil, signal, sys
calls = [0]
real_pwrite, real_rmtree = os.pwrite, shutil.rmtree
def pwrite(fd, data, offset):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_pwrite(fd, data, offset)
def rmtree(path, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return real_rmtree(path, *args, **kwargs)
os.pwrite, shutil.rmtree = pwrite, rmtree
from weightweaving.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_inside_the_commit_leaves_a_whole_output(tmp_path, sig):
    b, ms, base, tuned = write_models(tmp_path)
    out = tmp_path / "out"
    merge = ["merge", "--base", b, "--models", *ms, "--out", out, "--overwrite"]
    first = run_cli_many({"old": [*merge, "--lambda", "0.7"]})["old"]
    assert first.returncode == 0, first.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            SIGNAL_IN_COMMIT,
            str(int(sig)),
            str(out),
            *map(str, merge),
            "--lambda",
            "0.3",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert (res.returncode, res.stderr) == (
        130,
        f"error: interrupted; the output was complete and is in place: {out}\n",
    )
    _assert_is(out, task_arithmetic(base, tuned, 0.3))  # the new output, whole
    assert leftovers(tmp_path) == []  # and no "-old" folder left behind
    if sig == signal.SIGINT:
        return
    res = subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_ABORT, *map(str, merge), "--lambda", "0.1"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert (res.returncode, res.stderr) == (130, "error: interrupted; no output was written\n")
    _assert_is(out, task_arithmetic(base, tuned, 0.3))  # the earlier output, untouched
    assert leftovers(tmp_path) == []


def _handles(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` installed (the kernel's SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def test_signals_while_the_modules_import(tmp_path):
    """SIGINT or SIGTERM from the moment the package starts importing (torch takes a second): one line."""
    b, ms, *_ = write_models(tmp_path)
    out = tmp_path / "out"
    rng = random.Random(23)
    cmd = [sys.executable, "-m", "weightweaving", "merge", "--base", b, "--models", *ms, "--out", out]
    for attempt in range(4):
        sig = signal.SIGINT if attempt % 2 == 0 else signal.SIGTERM
        proc = subprocess.Popen(
            list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
        deadline = time.monotonic() + 30
        while not _handles(proc.pid, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)  # our handler is in: the package began importing
        time.sleep(rng.uniform(0, 0.2))
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:  # a fast machine finished first
            assert stdout.startswith("wrote ") and stderr == ""
            shutil.rmtree(out)
            continue
        assert (proc.returncode, stderr) == (130, "error: interrupted; no output was written\n"), stderr
        assert not out.exists() and leftovers(tmp_path) == []
