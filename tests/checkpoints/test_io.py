"""Reading every supported format and the writer's exact bytes."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

import weightweaving
from tests.helpers import save_safetensors, toy_models
from weightweaving.checkpoints import OutputEntry, SafetensorsWriter, open_checkpoint


def test_writer_golden_bytes(tmp_path):
    entries = [OutputEntry("a", (2,), torch.float32), OutputEntry("b", (), torch.float16)]
    with SafetensorsWriter(tmp_path / "out", entries) as writer:
        writer.write("a", torch.tensor([1.0, 2.0]))
        writer.write("b", torch.tensor(3.0, dtype=torch.float16))
        writer.commit()
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    header = (
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"F16","shape":[],"data_offsets":[8,10]}}'
    )
    header += b" " * (-len(header) % 8)
    expected = struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0) + struct.pack("<e", 3.0)
    assert raw == expected
    loaded = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(loaded["a"], torch.tensor([1.0, 2.0])) and loaded["b"].dtype == torch.float16


def test_writer_abort_leaves_nothing(tmp_path):
    entries = [OutputEntry("a", (2,), torch.float32)]
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "out", entries) as writer:
            writer.write("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_pt_nested_and_prefixed_state_dicts_merge_like_safetensors(tmp_path):
    base, tuned = toy_models(2)
    save_safetensors(tmp_path / "base.safetensors", base)
    torch.save({"state_dict": {f"module.{k}": v for k, v in tuned[0].items()}, "epoch": 3}, tmp_path / "a.pt")
    torch.save(tuned[1], tmp_path / "pytorch_model.bin")
    folder = tmp_path / "hf"
    folder.mkdir()
    (tmp_path / "pytorch_model.bin").rename(folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    got = weightweaving.merge(
        tmp_path / "base.safetensors", [tmp_path / "a.pt", folder], "task_arithmetic", 0.5
    )
    want = weightweaving.merge(base, tuned, "task_arithmetic", 0.5)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_sharded_input(tmp_path):
    base, tuned = toy_models(2)
    weightweaving.merge(base, [base], "task_arithmetic", 0.0, out=tmp_path / "sharded", shard_size=200)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ckpt = open_checkpoint(tmp_path / "sharded")
    assert ckpt.keys() == list(base)
    got = weightweaving.merge(tmp_path / "sharded", tuned, "task_arithmetic", 1.0)
    want = weightweaving.merge(base, tuned, "task_arithmetic", 1.0)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_include_exclude_and_dtype(tmp_path):
    base, tuned = toy_models(2)
    got = weightweaving.merge(base, tuned, "task_arithmetic", 1.0, exclude=["conv1"], dtype="bfloat16")
    assert torch.equal(got["conv1.weight"], base["conv1.weight"].to(torch.bfloat16))
    assert got["ln.weight"].dtype == torch.bfloat16 and got["position_ids"].dtype == torch.int64
    only = weightweaving.merge(base, tuned, "task_arithmetic", 1.0, include=[r"attn\.in_proj\.weight$"])
    assert torch.equal(only["ln.weight"], base["ln.weight"])
    assert not torch.equal(only["blocks.0.attn.in_proj.weight"], base["blocks.0.attn.in_proj.weight"])


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_read_into_fills_a_buffer_with_the_tensor_or_its_rows_in_the_buffers_dtype(tmp_path, stored):
    values = torch.randn(6, 3).to(stored)
    save_safetensors(tmp_path / "m.safetensors", {"w": values})
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    whole = torch.full((6, 3), float("nan"))
    ckpt.read_into("w", whole)  # float32 file: straight into the buffer; bfloat16: converted
    assert torch.equal(whole, values.float())
    rows = torch.full((2, 3), float("nan"), dtype=torch.float64)
    ckpt.read_into("w", rows, 2, 4)
    assert torch.equal(rows, values[2:4].double())
    in_memory = torch.empty(2, 3)
    from weightweaving.checkpoints.base import StateDictCheckpoint

    StateDictCheckpoint({"w": values}).read_into("w", in_memory, 4, 6)  # the generic path
    assert torch.equal(in_memory, values[4:6].float())
