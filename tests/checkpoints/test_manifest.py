"""Every output carries a manifest written last; ``verify`` names the file that differs."""

from __future__ import annotations

import hashlib
import json

import torch

import weightweaving
from tests.helpers import run_cli, save_hf_folder, toy_models
from weightweaving.checkpoints import OutputEntry, SafetensorsWriter
from weightweaving.checkpoints.manifest import MANIFEST, verify
from weightweaving.cli import main


def _merged(tmp_path, **kwargs):
    base, tuned = toy_models(2)
    save_hf_folder(tmp_path / "base", base)
    for i, sd in enumerate(tuned):
        save_hf_folder(tmp_path / f"ft{i}", sd)
    return weightweaving.merge(
        tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], out=tmp_path / "out", **kwargs
    )


def test_manifest_holds_the_sha256_of_every_file_and_the_config(tmp_path):
    out = _merged(tmp_path, shard_size="400B")  # sharded: the weights are hashed while written
    manifest = json.loads((out / MANIFEST).read_text())
    files = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files and len([f for f in files if f.endswith(".safetensors")]) > 1
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name
    assert manifest["config_sha256"] == manifest["files"]["weightweaving_config.yaml"]["sha256"]
    assert verify(out) == []


def test_writes_out_of_order_are_hashed_at_commit(tmp_path):
    entries = [OutputEntry("a", (3,), torch.float32), OutputEntry("b", (2,), torch.float32)]
    with SafetensorsWriter(tmp_path / "o", entries) as writer:
        writer.write("b", torch.ones(2))
        writer.write("a", torch.zeros(3))
        out = writer.commit()
    entry = json.loads((out / MANIFEST).read_text())["files"]["model.safetensors"]
    assert entry["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_rows_are_hashed_as_written_in_order_and_at_commit_otherwise(tmp_path):
    entries = [OutputEntry("a", (4, 2), torch.float32), OutputEntry("b", (2,), torch.float32)]
    for order in ([0, 2], [2, 0]):  # rows in file order (streamed hash), then rows out of order
        with SafetensorsWriter(tmp_path / f"o{order[0]}", entries) as writer:
            for start in order:
                writer.write_rows("a", start, torch.arange(4.0).reshape(2, 2) + start)
            streamed = writer._hashes[writer._files["a"][0]][1] is not None
            writer.write("b", torch.ones(2))
            out = writer.commit()
        assert streamed == (order == [0, 2])
        entry = json.loads((out / MANIFEST).read_text())["files"]["model.safetensors"]
        assert entry["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        assert verify(out) == []


def test_verify_names_each_file_that_differs_is_missing_or_was_added(tmp_path, capsys):
    out = _merged(tmp_path)
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out == f"ok: {out}: every file matches its manifest\n"
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # same size, one bit of one tensor: safetensors still opens it
    weights.write_bytes(bytes(data))
    (out / "config.json").unlink()
    (out / "notes.txt").write_text("added later")
    assert main(["verify", str(out)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{out / 'config.json'}: missing",
        f"{weights}: content differs (SHA-256 mismatch)",
        f"{out / 'notes.txt'}: not in the manifest (added after writing)",
    ]


def test_verify_without_a_manifest_is_a_user_error(tmp_path):
    save_hf_folder(tmp_path / "plain", {"w": torch.zeros(2)})
    res = run_cli("verify", tmp_path / "plain")
    assert res.returncode == 2
    assert (
        res.stderr == f"error: {tmp_path / 'plain'}: has no {MANIFEST}; it was not written by weightweaving\n"
    )
