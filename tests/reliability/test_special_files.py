"""Special files and path errors: refused by name before a byte is read, one line, exit 2, nothing left."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

import weightweaving
from tests.helpers import ROOT, load_folder, save_hf_folder, save_safetensors
from weightweaving.checkpoints import open_checkpoint
from weightweaving.errors import CheckpointError

from .util import assert_error, leftovers, run_cli_many, task_arithmetic, write_models

NOT_REGULAR = "not a regular file; refusing to read it"


def _one_at_a_time(cases):
    """The cases share one --out, so one runs at a time (two at once would meet the output's lock)."""
    return run_cli_many(cases, workers=1)


def test_special_files_are_refused_before_reading(tmp_path):
    """Devices, FIFOs, sockets and /proc files: as models, in folders, as shards, as a config, to convert."""
    b, ms, base, tuned = write_models(tmp_path)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block forever; reading a device would never end
    sock_path = tmp_path / "sock.safetensors"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    hf_fifo = tmp_path / "hf_fifo"
    hf_fifo.mkdir()
    os.mkfifo(hf_fifo / "model.safetensors")
    hf_dev = tmp_path / "hf_dev"
    hf_dev.mkdir()
    (hf_dev / "pytorch_model.bin").symlink_to("/dev/zero")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-1.safetensors"}}')
    (sharded / "model-1.safetensors").symlink_to("/dev/zero")
    index_fifo = tmp_path / "index_fifo"
    index_fifo.mkdir()
    os.mkfifo(index_fifo / "model.safetensors.index.json")
    config_fifo = tmp_path / "config.yaml"
    os.mkfifo(config_fifo)
    hf_carried = save_hf_folder(tmp_path / "hf_carried", base)  # a /proc file among the files carried over
    (hf_carried / "tokenizer.json").symlink_to("/proc/self/status")
    out = tmp_path / "out"  # never written: each case fails before
    merge = ["merge", "--out", out]
    try:
        res = _one_at_a_time(
            {
                "dev_zero_base": [*merge, "--base", "/dev/zero", "--models", *ms],
                "dev_zero_model": [*merge, "--base", b, "--models", ms[0], "/dev/zero"],
                "dev_null": [*merge, "--base", b, "--models", "/dev/null"],
                "fifo": [*merge, "--base", b, "--models", ms[0], fifo],
                "socket": [*merge, "--base", b, "--models", sock_path],
                "hf_fifo": [*merge, "--base", b, "--models", hf_fifo],
                "hf_dev": [*merge, "--base", b, "--models", hf_dev],
                "shard_dev": [*merge, "--base", b, "--models", sharded],
                "index_fifo": [*merge, "--base", b, "--models", index_fifo],
                "config_fifo": ["merge", config_fifo],
                "config_dev": ["merge", "/dev/zero"],
                "proc": [*merge, "--base", "/proc/self/status", "--models", *ms],
                "proc_carried": [*merge, "--base", hf_carried, "--models", *ms],
                "convert_fifo": ["convert", fifo, out / "c.safetensors"],
                "convert_dev": ["convert", "/dev/zero", out],
            }
        )
    finally:
        sock.close()
    dev = "is a character device, " + NOT_REGULAR
    assert_error(res["dev_zero_base"], f"/dev/zero: {dev}", out=out)
    assert_error(res["dev_zero_model"], f"/dev/zero: {dev}", out=out)
    assert_error(res["dev_null"], f"/dev/null: {dev}", out=out)
    assert_error(res["fifo"], f"{fifo}: is a FIFO (named pipe), {NOT_REGULAR}", out=out)
    assert_error(res["socket"], f"{sock_path}: is a socket, {NOT_REGULAR}", out=out)
    assert_error(
        res["hf_fifo"], f"{hf_fifo / 'model.safetensors'}: is a FIFO (named pipe), {NOT_REGULAR}", out=out
    )
    assert_error(res["hf_dev"], f"{hf_dev / 'pytorch_model.bin'}: {dev}", out=out)
    assert_error(res["shard_dev"], f"{sharded / 'model-1.safetensors'}: {dev}", out=out)
    assert_error(
        res["index_fifo"],
        f"{index_fifo / 'model.safetensors.index.json'}: is a FIFO (named pipe), {NOT_REGULAR}",
        out=out,
    )
    assert_error(res["config_fifo"], f"{config_fifo}: is a FIFO (named pipe), {NOT_REGULAR}")
    assert_error(res["config_dev"], f"/dev/zero: {dev}")
    proc = "is a file of the kernel's /proc file system (its size is not its content); refusing to read it"
    assert_error(res["proc"], f"/proc/self/status: {proc}", out=out)
    assert_error(res["proc_carried"], f"{hf_carried / 'tokenizer.json'}: {proc}", out=out)
    assert_error(res["convert_fifo"], f"{fifo}: is a FIFO (named pipe), {NOT_REGULAR}", out=out)
    assert_error(res["convert_dev"], f"/dev/zero: {dev}", out=out)
    assert leftovers(tmp_path) == []


def test_path_errors_are_one_line(tmp_path):
    """Symlink loops, names too long, dangling links: ``error: <file>: <problem>``, exit 2."""
    b, ms, *_ = write_models(tmp_path)
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    loop = tmp_path / "loop_a"
    too_long = tmp_path / ("x" * 300 + ".safetensors")
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere.safetensors")
    hf_loop = tmp_path / "hf_loop"
    hf_loop.mkdir()
    (hf_loop / "model.safetensors").symlink_to(hf_loop / "model.safetensors")
    out = tmp_path / "out"
    merge = ["merge", "--out", out]
    res = _one_at_a_time(
        {
            "loop_base": [*merge, "--base", loop, "--models", *ms],
            "loop_model": [*merge, "--base", b, "--models", ms[0], loop],
            "loop_config": ["merge", loop],
            "loop_out": ["merge", "--base", b, "--models", *ms, "--out", loop],
            "too_long": [*merge, "--base", b, "--models", too_long],
            "dangling": [*merge, "--base", b, "--models", dangling],
            "hf_loop": [*merge, "--base", b, "--models", hf_loop],
        }
    )
    eloop = "Too many levels of symbolic links"
    assert_error(res["loop_base"], f"{loop}: cannot read: {eloop}", out=out)
    assert_error(res["loop_model"], f"{loop}: cannot read: {eloop}", out=out)
    assert_error(res["loop_config"], f"{loop}: cannot read: {eloop}")
    assert_error(res["loop_out"], f"{loop}: cannot resolve the output path: {eloop}")
    assert_error(res["too_long"], f"{too_long}: cannot read: File name too long", out=out)
    assert_error(res["dangling"], f"{dangling}: no such file or folder", out=out)
    assert_error(res["hf_loop"], f"{hf_loop / 'model.safetensors'}: cannot read: {eloop}", out=out)
    assert leftovers(tmp_path) == []


# The real CLI, with os.open failing with EACCES on one file (tests run as root, whom modes do not stop).
PERMISSION_DENIED = """
import errno, os, sys
real_open = os.open
def deny(path, *args, **kwargs):
    if str(path).endswith(sys.argv[1]):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return real_open(path, *args, **kwargs)
os.open = deny
from weightweaving.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_permission_denied(tmp_path):
    b, ms, *_ = write_models(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            PERMISSION_DENIED,
            ms[1].name,
            "merge",
            "--base",
            b,
            "--models",
            *ms,
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_error(res, f"{ms[1]}: cannot read: Permission denied", out=out)


def test_file_vanishing_or_replaced_during_a_run_stops_cleanly(tmp_path, monkeypatch):
    """Between planning and reading, a file is removed, rewritten in place, or replaced by another."""
    b, ms, base, tuned = write_models(tmp_path)
    from weightweaving.engine.execute import Runner

    real_run = Runner.run_pieces
    out = tmp_path / "out"

    def merge_while(change):
        def run(self, unit_fn, desc="merging"):
            change()
            yield from real_run(self, unit_fn, desc)

        monkeypatch.setattr(Runner, "run_pieces", run)
        with pytest.raises(CheckpointError) as err:
            weightweaving.merge(b, ms, "task_arithmetic", 0.5, out=out)
        assert not out.exists() and leftovers(tmp_path) == []
        return str(err.value)

    data = ms[1].read_bytes()
    assert merge_while(ms[1].unlink) == f"{ms[1]}: no such file or folder"
    ms[1].write_bytes(data)
    # rewritten in place, same size: only the modification time tells
    stamp = os.stat(ms[1]).st_mtime_ns
    assert merge_while(lambda: os.utime(ms[1], ns=(stamp + 10**9, stamp + 10**9))) == (
        f"{ms[1]}: the file was modified while the merge ran"
    )
    os.utime(ms[1], ns=(stamp, stamp))
    # truncated in place
    assert merge_while(lambda: os.truncate(ms[1], len(data) - 4)) == (
        f"{ms[1]}: the file changed size while the merge ran ({len(data)} -> {len(data) - 4} bytes)"
    )
    ms[1].write_bytes(data)

    # replaced by another file (a rename) after its data was read: noticed before the output is committed
    def replace_later():
        other = tmp_path / "other.safetensors"
        save_safetensors(other, {k: v + 1 if v.is_floating_point() else v for k, v in tuned[1].items()})
        os.replace(other, ms[1])

    real_deliver_write = weightweaving.checkpoints.writer.SafetensorsWriter.write
    calls = []

    def write(self, name, tensor):
        real_deliver_write(self, name, tensor)
        if not calls:
            calls.append(name)
            replace_later()

    monkeypatch.setattr(Runner, "run_pieces", real_run)
    monkeypatch.setattr(weightweaving.checkpoints.writer.SafetensorsWriter, "write", write)
    with pytest.raises(CheckpointError, match="the file was replaced while the merge ran"):
        weightweaving.merge(b, ms, "task_arithmetic", 0.5, out=out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_short_reads_give_the_same_merge(tmp_path, monkeypatch):
    """A file system that returns a few bytes per read (FUSE, network mounts): same bytes merged."""
    b, ms, base, tuned = write_models(tmp_path)
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd, n, offset):
        return real_pread(fd, min(n, 3), offset)

    def preadv(fd, buffers, offset):
        view = memoryview(buffers[0])[:5]
        return real_preadv(fd, [view], offset)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    got = weightweaving.merge(b, ms, "task_arithmetic", 0.5, out=tmp_path / "out")
    monkeypatch.undo()
    want = task_arithmetic(base, tuned, 0.5)
    merged = load_folder(got)
    for k in want:
        assert torch.equal(merged[k], want[k]), k


def test_reads_never_exceed_the_declared_sizes(tmp_path, monkeypatch):
    """A header is read in two bounded reads; a tensor read asks for exactly its bytes."""
    b, *_ = write_models(tmp_path)
    asked = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: asked.append(n) or real_pread(fd, n, off))
    ckpt = open_checkpoint(b)
    size = os.path.getsize(b)
    header_len = int.from_bytes(b.read_bytes()[:8], "little")
    assert asked == [8, header_len] and 8 + header_len < size
    name = ckpt.keys()[0]
    assert ckpt.get(name).numel() * ckpt.get(name).element_size() < size
