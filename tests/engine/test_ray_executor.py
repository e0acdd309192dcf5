"""The Ray executor on a real local cluster (two nodes, see ``tests/conftest.py``): the same bytes
as the local executor, our one-line errors, a killed worker retried, nothing left when it fails."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import weightweaving
from tests.helpers import run_cli, save_safetensors, toy_models
from weightweaving.checkpoints.manifest import verify
from weightweaving.engine import ray_executor
from weightweaving.engine.plan import Unit
from weightweaving.engine.ray_executor import INSTALL, RayExecutor, balanced_groups, import_ray
from weightweaving.errors import CheckpointError, OptionError
from weightweaving.suite.parallel import fork_map, ray_map


def _files(folder: Path) -> dict[str, bytes]:
    """Every weight file and index of an output, by name (provenance files name the output)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.name.endswith((".safetensors", ".index.json"))
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A base and three fine-tunes as safetensors files, one tensor large enough to be chunked."""
    root = tmp_path_factory.mktemp("ray-models")
    base, tuned = toy_models(3)
    gen = torch.Generator().manual_seed(3)
    base["embed.weight"] = torch.randn(300, 40, generator=gen).to(torch.bfloat16)
    for sd in tuned:
        sd["embed.weight"] = (base["embed.weight"].float() + 0.01 * torch.randn(300, 40, generator=gen)).to(
            torch.bfloat16
        )
    paths = [save_safetensors(root / f"m{i}.safetensors", sd) for i, sd in enumerate([base, *tuned])]
    return paths[0], paths[1:]


CASES = [
    ("merge", "ties", {"lam": 1.0, "k": 0.3}),  # global scope: the threshold pass runs on Ray
    ("merge", "pcb", {"lam": 1.0}),  # global order statistics from partial histograms
    ("merge", "dare", {"lam": 0.5, "p": 0.3, "seed": 7}),  # random draws keyed by name and seed
    ("merge", "tsv", {"lam": 1.0}),
    ("weave", "ties", {"lambdas": [0.3, 0.8], "pool": "random", "seed": 5}),
]


def test_same_bytes_as_local(ray_cluster, models, tmp_path):
    base, tuned = models
    for i, (op, method, kwargs) in enumerate(CASES):
        run = weightweaving.merge if op == "merge" else weightweaving.weave
        local = run(base, tuned, method, out=tmp_path / f"local{i}", shard_size="3KB", **kwargs)
        remote = run(
            base, tuned, method, out=tmp_path / f"ray{i}", shard_size="3KB", executor="ray", **kwargs
        )
        assert len(_files(local)) > 2, "the output should be sharded, with an index"
        assert _files(local) == _files(remote), (op, method)
        assert verify(remote) == []  # the manifest covers what the workers wrote


def test_chunks_on_workers_same_bytes_as_whole_local(ray_cluster, models, tmp_path, monkeypatch):
    """Chunks of rows merged on Ray workers (random draws included) give the local whole merge's bytes."""
    from weightweaving.engine import execute

    base, tuned = models
    cases = [CASES[2], CASES[4], ("merge", "pcb", {"lam": 1.0})]
    local = {}
    for i, (op, method, kwargs) in enumerate(cases):
        run = weightweaving.merge if op == "merge" else weightweaving.weave
        local[i] = _files(run(base, tuned, method, out=tmp_path / f"local{i}", **kwargs))
    monkeypatch.setattr(execute, "CHUNK_BYTES", 3 * 40 * 4 * 7)  # 7 rows of embed.weight per chunk
    for i, (op, method, kwargs) in enumerate(cases):
        run = weightweaving.merge if op == "merge" else weightweaving.weave
        remote = run(base, tuned, method, out=tmp_path / f"ray{i}", executor="ray", **kwargs)
        assert _files(remote) == local[i], (op, method)


def test_exact_fallback_passes_combine_on_the_workers(ray_cluster, monkeypatch):
    """TIES with windows too wide to ship: bucket histograms are summed per task on the workers."""
    from weightweaving.methods import ties

    monkeypatch.setattr(ties, "_WINDOW_CAP", 0)
    monkeypatch.setattr(ray_executor, "TASKS_PER_WORKER", 1)  # several units per task
    base, tuned = toy_models(3)
    local = weightweaving.merge(base, tuned, "ties", 1.0, k=0.3)
    executor = RayExecutor()
    combined = []
    real = executor.map_combined

    def spy(fn, items, combine):
        work = list(items)
        out = list(real(fn, work, combine))
        combined.append((len(work), len(out)))
        return iter(out)

    executor.map_combined = spy  # type: ignore[method-assign]
    remote = weightweaving.merge(base, tuned, "ties", 1.0, k=0.3, executor=executor)
    assert all(torch.equal(local[k], remote[k]) for k in local)
    assert len(combined) == 1 and combined[0][1] < combined[0][0]  # fewer partials than units


def test_state_dicts_go_through_the_object_store(ray_cluster):
    base, tuned = toy_models(3)
    local = weightweaving.merge(base, tuned, "ties", 0.9, k=0.4)
    remote = weightweaving.merge(base, tuned, "ties", 0.9, k=0.4, executor="ray")
    assert local.keys() == remote.keys()
    for name in local:
        assert torch.equal(local[name], remote[name]), name


def test_killed_worker_is_retried(ray_cluster, models, tmp_path):
    base, tuned = models
    local = weightweaving.merge(base, tuned, "dare", 0.5, p=0.3, out=tmp_path / "local")
    executor = RayExecutor()
    executor._pause = str(tmp_path / "paused")
    done: dict[str, object] = {}

    def run() -> None:
        try:
            done["out"] = weightweaving.merge(
                base, tuned, "dare", 0.5, p=0.3, out=tmp_path / "ray", executor=executor
            )
        except BaseException as exc:  # reported below
            done["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    marker = tmp_path / "paused"
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(marker.read_text())
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)  # the worker dies mid-task; Ray runs the task again elsewhere
    thread.join(120)
    assert "error" not in done, done.get("error")
    assert _files(local) == _files(Path(str(done["out"])))


def test_interrupted_run_leaves_nothing(ray_cluster, models, tmp_path):
    """Ctrl-C on the driver while a task runs: its tasks are cancelled, no output, no staging."""
    base, tuned = models
    executor = RayExecutor()
    executor._pause = str(tmp_path / "paused")
    out = tmp_path / "out"

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while not (tmp_path / "paused").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # reaches the main thread, waiting on the cluster

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        weightweaving.merge(base, tuned, "ties", out=out, executor=executor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paused"]


def test_worker_error_is_our_one_line(ray_cluster, models, tmp_path):
    base, tuned = models
    executor = RayExecutor()
    executor._pause = str(tmp_path / "paused")
    executor._pause_seconds = 3.0
    replaced = tmp_path / "replaced.safetensors"
    replaced.write_bytes(tuned[0].read_bytes())
    failure: dict[str, BaseException] = {}

    def run() -> None:
        try:
            weightweaving.merge(base, [replaced, *tuned[1:]], out=tmp_path / "out", executor=executor)
        except BaseException as exc:
            failure["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "paused").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    new = tmp_path / "new.safetensors"
    new.write_bytes(tuned[0].read_bytes())
    os.replace(new, replaced)  # planned, then replaced before a worker reads it
    thread.join(120)
    error = failure.get("error")
    assert isinstance(error, CheckpointError), error
    assert str(error) == f"{replaced}: the file was replaced while the merge ran"
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging left


def test_cli_executor_ray(ray_cluster, models, tmp_path):
    base, tuned = models
    args = ["merge", "--base", base, "--models", *tuned, "--method", "ties", "--lambda", "1"]
    remote = run_cli(*args, "--out", tmp_path / "ray", "--executor", "ray", "--ray-address", ray_cluster)
    assert remote.returncode == 0, remote.stderr
    # nothing but Ray's core warning that it finds no address beyond loopback (true here, by design)
    assert [line for line in remote.stderr.splitlines() if "network_util.cc" not in line] == []
    local = weightweaving.merge(base, tuned, "ties", 1.0, out=tmp_path / "local")
    assert _files(local) == _files(tmp_path / "ray")


def test_nonfinite_found_by_a_worker(ray_cluster, tmp_path):
    base, tuned = toy_models(3)
    tuned[1]["ln.weight"] = tuned[1]["ln.weight"].clone()
    tuned[1]["ln.weight"][0] = float("nan")
    paths = [save_safetensors(tmp_path / f"m{i}.safetensors", sd) for i, sd in enumerate([base, *tuned])]
    errors = []
    for executor in ("local", "ray"):
        with pytest.raises(CheckpointError) as info:
            weightweaving.merge(paths[0], paths[1:], "ties", out=tmp_path / executor, executor=executor)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert "contains NaN or Inf values" in errors[1] and "\n" not in errors[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{i}.safetensors" for i in range(4)]


def test_lambda_sweep_one_task_per_point(ray_cluster):
    """A λ sweep (merge, then score each point) as Ray tasks gives the forked processes' results."""
    base, tuned = toy_models(3)
    probe = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=probe) for k, v in base.items() if v.is_floating_point()}
    lams = [0.1 * i for i in range(1, 9)]

    def point(index: int) -> tuple[float, int]:
        merged = weightweaving.merge(base, tuned, "ties", lams[index], k=0.3)
        score = sum(float((merged[k].double() * d).sum()) for k, d in direction.items())
        return score, os.getpid()

    local = list(fork_map(point, len(lams), workers=2))
    remote = list(ray_map(point, len(lams)))
    assert [score for score, _ in remote] == [score for score, _ in local]
    assert os.getpid() not in {pid for _, pid in remote}  # run by the cluster's workers


def test_without_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(OptionError, match=r"pip install 'weightweaving\[ray\]'"):
        import_ray()
    base, tuned = toy_models(2)
    with pytest.raises(OptionError) as info:
        weightweaving.merge(base, tuned, executor="ray")
    assert str(info.value) == INSTALL


def test_unknown_executor_is_refused():
    base, tuned = toy_models(2)
    with pytest.raises(OptionError, match="did you mean 'ray'"):
        weightweaving.merge(base, tuned, executor="rya")
    with pytest.raises(OptionError, match="--ray-address needs --executor ray"):
        weightweaving.merge(base, tuned, ray_address="127.0.0.1:1")


def test_groups_are_balanced_by_bytes():
    units = [
        Unit(f"u{i}", (n,), torch.float32, torch.float32, True)
        for i, n in enumerate([100, 100, 400, 50, 50, 300])
    ]
    groups = balanced_groups(units, parallelism=1)  # about 4 groups of 250 elements (1000 bytes)
    assert [u.name for g in groups for u in g] == [u.name for u in units]  # in order, all of them
    assert [sum(u.numel for u in g) for g in groups] == [200, 400, 100, 300]
    assert len(balanced_groups(units, parallelism=1, task_bytes=1)) == len(units)
