"""The suite's worker processes: order, equality with a plain loop, Ctrl-C, stale cache files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from weightweaving.suite.cache import CheckpointCache
from weightweaving.suite.parallel import default_workers, fork_map


def test_fork_map_keeps_order_and_matches_a_loop() -> None:
    def job(index: int) -> tuple[int, int]:
        time.sleep(0.02 * (5 - index % 5))  # later jobs finish first
        return index, os.getpid()

    results = list(fork_map(job, 10, workers=2))
    assert [index for index, _ in results] == list(range(10))
    assert {pid for _, pid in results} != {os.getpid()}  # computed in workers
    assert [index for index, _ in fork_map(job, 10, workers=1)] == list(range(10))
    assert {pid for _, pid in fork_map(job, 3, workers=1)} == {os.getpid()}


def test_worker_errors_reach_the_caller() -> None:
    def job(index: int) -> int:
        if index == 3:
            raise ValueError("job 3 failed")
        return index

    with pytest.raises(ValueError, match="job 3 failed"):
        list(fork_map(job, 6, workers=2))


def test_default_workers_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTWEAVING_SUITE_WORKERS", "3")
    assert default_workers() == 3
    monkeypatch.delenv("WEIGHTWEAVING_SUITE_WORKERS")
    assert 1 <= default_workers() <= 8


def test_ctrl_c_stops_the_workers_without_tracebacks(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from weightweaving.suite.parallel import fork_map

        def job(index):
            Path({str(ready)!r}).joinpath(str(index)).touch()
            time.sleep(60)
            return index

        try:
            list(fork_map(job, 4, workers=2))
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        """
    )
    ready.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while len(list(ready.iterdir())) < 2:  # both workers busy
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and stderr.strip() == "error: interrupted"
    time.sleep(0.2)
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        pass  # no worker outlived the parent
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("a worker process outlived the interrupted run")


def test_cache_removes_temporaries_of_dead_processes(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"finetune-abc.tmp{dead.pid}"
    live = tmp_path / f"finetune-def.tmp{os.getpid()}"
    keep = tmp_path / "finetune-abc.safetensors"
    for path in (stale, live, keep):
        path.write_bytes(b"x")
    CheckpointCache(tmp_path)
    assert not stale.exists() and live.exists() and keep.exists()


def test_flush_denormals_is_scoped() -> None:
    from weightweaving.suite.train import flush_denormals

    tiny = torch.tensor([1e-39])  # a float32 subnormal
    with flush_denormals():
        assert (tiny * 1.0).item() == 0.0
        with flush_denormals():  # e.g. pre-training inside a run
            assert (tiny * 1.0).item() == 0.0
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() > 0.0
