"""Shared fixtures: one local Ray cluster per test session, inside a network namespace of its own."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLONE_NEWNET = 0x40000000
RAY_PORT = 6379  # free for sure: the namespace is ours


def _libc_call(name: str, *args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The address of a running local Ray cluster: a head node and a second node joining it, one
    CPU and a 100 MB object store each, started in a network namespace with only loopback (Ray
    advertises the machine's address even when told 127.0.0.1: there it has none). The test
    process moves into that namespace for the session and back out at the end; the cluster's
    processes are stopped by their process group, never by name."""
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    if ray.is_initialized():
        ray.shutdown()
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    _libc_call("unshare", CLONE_NEWNET)  # needs root (tests and CI run as root here)
    temp = Path(tempfile.mkdtemp(prefix="wwray-", dir="/tmp"))  # short: Ray's socket paths
    group: int | None = None
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "RAY_AUTH_MODE")}
    try:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        bin_dir = Path(sys.executable).parent
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "RAY_USAGE_STATS_ENABLED": "0",
            # no token authentication, whatever ~/.ray/auth_token a local ray.init left behind
            "RAY_AUTH_MODE": "disabled",
        }
        common = (
            "--num-cpus=1 --object-store-memory=100000000 --node-ip-address=127.0.0.1 --disable-usage-stats"
        )
        script = (
            f"{bin_dir / 'ray'} start --head --port={RAY_PORT} --include-dashboard=false "
            f"--temp-dir={temp} {common} && "
            f"{bin_dir / 'ray'} start --address=127.0.0.1:{RAY_PORT} {common}"
        )
        starter = subprocess.Popen(
            ["bash", "-c", script],
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        group = starter.pid
        output, _ = starter.communicate(timeout=120)
        if starter.returncode != 0:
            raise RuntimeError("ray start failed:\n" + output.decode(errors="replace")[-3000:])
        address = f"127.0.0.1:{RAY_PORT}"
        for name in saved:  # for this driver and those that tests start (the CLI)
            os.environ[name] = env[name]
        ray.init(address=address, log_to_driver=False)
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if group is not None:  # a throwaway cluster: its whole process group, at once
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _libc_call("setns", home, CLONE_NEWNET)
        os.close(home)
        shutil.rmtree(temp, ignore_errors=True)
