"""The output folder: refused when unsafe, never half-written, and a killed run leaves nothing usable-looking."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, load_folder, save_hf_folder, save_safetensors

from .util import STAGING_MARK, assert_error, leftovers, run_cli_many, task_arithmetic, write_models


def _cli(args, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=120, **kwargs
    )


def test_unsafe_outputs_are_refused(tmp_path):
    b, ms, base, tuned = write_models(tmp_path)
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "keep.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    folder_models = [save_hf_folder(tmp_path / f"hf{i}", sd) for i, sd in enumerate(tuned)]
    merge = ["merge", "--base", b, "--models", *ms]
    res = run_cli_many(
        {
            "exists": [*merge, "--out", exists],
            "file_with_overwrite": [*merge, "--out", a_file, "--overwrite"],
            "is_base": [*merge, "--out", b, "--overwrite"],
            "is_model_folder": [
                "merge",
                "--base",
                b,
                "--models",
                *folder_models,
                "--out",
                folder_models[1],
                "--overwrite",
            ],
            "holds_inputs": [*merge, "--out", tmp_path, "--overwrite"],
            "parent_is_file": [*merge, "--out", a_file / "merged"],
            # Tests run as root, for whom permission bits do not stop a write: /proc refuses new folders even so.
            "proc": [*merge, "--out", "/proc/weightweaving-test/merged"],
        }
    )
    assert_error(res["exists"], f"{exists}: the output folder exists; pass --overwrite to replace it")
    assert (exists / "keep.txt").read_text() == "mine"
    assert_error(res["file_with_overwrite"], f"{a_file}: the output path exists and is not a folder")
    assert a_file.read_text() == "not a folder"
    inputs = "the output folder is one of the inputs; choose another --out"
    assert_error(res["is_base"], f"{b}: {inputs}")
    assert_error(res["is_model_folder"], f"{folder_models[1]}: {inputs}")
    assert_error(res["holds_inputs"], f"{tmp_path}: {inputs}")
    assert load_folder(folder_models[1]).keys() == base.keys() and b.exists()
    assert_error(
        res["parent_is_file"],
        f"{a_file / 'merged'}: cannot create the output folder: '{a_file}' is a file, not a folder",
    )
    assert_error(
        res["proc"], "/proc/weightweaving-test: cannot create the output folder: No such file or directory"
    )
    assert leftovers(tmp_path) == []


def _limit_file_size() -> None:
    signal.signal(
        signal.SIGXFSZ, signal.SIG_IGN
    )  # writes past the limit fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))


# Runs the real CLI with os.pwrite failing with ENOSPC from its 4th call on: the disk fills up mid-write.
DISK_FILLS_UP = """
import errno, os, sys
real_pwrite, calls = os.pwrite, [0]
def pwrite(fd, data, offset):
    calls[0] += 1
    if calls[0] >= 4:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_pwrite(fd, data, offset)
os.pwrite = pwrite
from weightweaving.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full(tmp_path):
    b, ms, *_ = write_models(tmp_path)
    out = tmp_path / "out"
    merge = ["merge", "--base", b, "--models", *ms, "--out", out]
    res = _cli(["-m", "weightweaving", *merge], preexec_fn=_limit_file_size)
    assert_error(res, f"{out}: cannot write the output: File too large", out=out)
    res = _cli(["-c", DISK_FILLS_UP, *merge])
    # pwrite calls: the header, then tensors in the base's order: the 3rd tensor fails
    third = list(load_folder_header_order(b))[2]
    assert_error(res, f"{out}: parameter '{third}' cannot write the output: No space left on device", out=out)
    res = _cli(["-m", "weightweaving", *merge])  # space again: the next run succeeds
    assert res.returncode == 0, res.stderr
    assert leftovers(tmp_path) == []


def load_folder_header_order(path):
    from weightweaving.checkpoints import open_checkpoint

    return open_checkpoint(path).keys()


# -- interruptions ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    """Three 48 MiB checkpoints: a merge takes about a second, long enough to be hit at random moments."""
    d = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(768, 1024, generator=gen) for i in range(16)}
    tuned = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    b = save_safetensors(d / "base.safetensors", base)
    ms = [save_safetensors(d / f"ft{i}.safetensors", sd) for i, sd in enumerate(tuned)]
    return d, b, ms, task_arithmetic(base, tuned, 0.3)


def _assert_nothing_half_done(out, want) -> None:
    """The output either does not exist or is the complete, correct merge."""
    if out.exists():
        got = load_folder(out)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    hidden = [name for name in leftovers(out.parent) if not name.startswith(".")]
    assert hidden == [], "a staging folder that is not hidden"


def test_interrupted_merges_leave_nothing_half_done(big_models):
    """SIGINT, SIGTERM and SIGKILL at random moments of a merge, 8 times; then a run that must succeed cleanly.

    The moment that once left an ``-old`` folder behind (a signal between the two renames of an
    ``--overwrite`` commit) is hit every time by ``test_concurrency_and_signals.py``.
    """
    d, b, ms, want = big_models
    out = d / "merged"
    rng = random.Random(6)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable,
        "-m",
        "weightweaving",
        "merge",
        "--base",
        b,
        "--models",
        *ms,
        "--lambda",
        "0.3",
        "--out",
        out,
        "--overwrite",
    ]
    deadline = time.monotonic() + 60
    for attempt in range(8):
        if time.monotonic() > deadline:
            break
        sig = (signal.SIGINT, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)[attempt % 4]
        proc = subprocess.Popen(
            list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        mine = f"{STAGING_MARK}{proc.pid}-"
        while proc.poll() is None and not any(mine in name for name in leftovers(d)):  # the merge is writing
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 1.0))
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        assert "Traceback" not in stderr, stderr
        if sig != signal.SIGKILL and proc.returncode == -sig:
            # the signal came as the interpreter shut down, after the merge was written
            assert stdout.startswith("wrote ") and stderr == "" and out.exists()
        elif sig != signal.SIGKILL:
            assert (proc.returncode, stderr.strip()) in {
                (130, "error: interrupted; no output was written"),
                (130, f"error: interrupted; the output was complete and is in place: {out}"),
                (0, ""),
            }
            assert leftovers(d) == []  # Ctrl-C and SIGTERM clean up after themselves
        _assert_nothing_half_done(out, want)
    res = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert leftovers(d) == []  # stale staging folders of killed runs are gone
    _assert_nothing_half_done(out, want)
    assert out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; see the /proc case above")
def test_read_only_parent(tmp_path):
    b, ms, *_ = write_models(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        res = run_cli_many({"locked": ["merge", "--base", b, "--models", *ms, "--out", locked / "out"]})[
            "locked"
        ]
    finally:
        locked.chmod(0o755)
    assert_error(
        res,
        f"{locked / 'out'}: cannot create the output folder: '{locked}' is not writable",
        out=locked / "out",
    )
