"""``weightweaving convert``: pickled whole modules to safetensors, with nothing in the file run."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_cli
from weightweaving.checkpoints.convert import read_pickled
from weightweaving.cli import main
from weightweaving.errors import CheckpointError

# A stand-in for the papers' ``src.modeling.ImageEncoder``: module classes that exist only in a
# folder the test process never puts on its path.
MODELING = textwrap.dedent(
    """
    import enum
    import functools

    import torch
    from torch import nn


    class Mode(enum.Enum):
        BICUBIC = "bicubic"


    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.ln = nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            self.register_buffer("scratch", torch.zeros(width), persistent=False)  # not in state_dict


    class ImageEncoder(nn.Module):
        def __init__(self, width=6):
            super().__init__()
            self.stem = nn.Linear(4, width, bias=False)  # its 'bias' parameter is None
            self.blocks = nn.Sequential(Block(width), Block(width))
            self.head = self.blocks[1].mlp[2]  # the same module under two names (tied weights)
            self.register_buffer("attn_mask", torch.ones(3, 3).triu())
            self.register_buffer("proj_t", torch.arange(12.0).reshape(3, 4).t())  # not contiguous
            self.register_buffer("position_ids", torch.arange(5))
            self.half_scale = nn.Parameter(torch.full((2,), 0.5, dtype=torch.bfloat16))
            self.mode = Mode.BICUBIC
            self.preprocess = functools.partial(max, 1)
            self.name = "ViT-tiny"
    """
)

SAVE = textwrap.dedent(
    """
    import sys

    import torch

    from fakepkg.modeling import ImageEncoder

    out = sys.argv[1]
    torch.manual_seed(0)
    base = ImageEncoder()
    torch.save(base, f"{out}/whole.pt")
    torch.save(base.state_dict(), f"{out}/whole_state_dict.pt")
    torch.save(base, f"{out}/legacy.pt", _use_new_zipfile_serialization=False)
    tuned = ImageEncoder()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn(p.shape).to(p.dtype))
    torch.save(tuned, f"{out}/tuned.pt")
    torch.save(tuned.state_dict(), f"{out}/tuned_state_dict.pt")
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Whole-module pickles made in a subprocess that can import ``fakepkg``."""
    root = tmp_path_factory.mktemp("convert")
    package = root / "code" / "fakepkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "modeling.py").write_text(MODELING)
    files = root / "files"
    files.mkdir()
    env = {**os.environ, "PYTHONPATH": str(root / "code")}
    subprocess.run([sys.executable, "-c", SAVE, str(files)], check=True, env=env, timeout=120)
    return files


def convert(capsys, *args: object) -> tuple[int, str, str]:
    """The CLI in this process (fast); ``run_cli`` runs it as a program where that matters."""
    code = main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _reference(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_the_module_classes_are_not_importable_here(saved):
    assert importlib.util.find_spec("fakepkg") is None
    with pytest.raises(Exception, match="fakepkg"):
        torch.load(saved / "whole.pt", weights_only=True)


def test_whole_module_to_a_file_equals_its_state_dict(saved, tmp_path):
    result = run_cli("convert", saved / "whole.pt", tmp_path / "encoder.safetensors")
    assert result.returncode == 0, result.stderr
    assert "from a pickled module 'fakepkg.modeling.ImageEncoder'" in result.stdout
    want = _reference(saved / "whole_state_dict.pt")
    assert "head.weight" in want and "blocks.1.mlp.2.weight" in want  # the tied module, twice
    assert "blocks.0.scratch" not in want and "stem.bias" not in want
    _assert_same(load_file(tmp_path / "encoder.safetensors"), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.safetensors"]  # no staging left


def test_legacy_format_to_a_folder(saved, tmp_path, capsys):
    code, _, err = convert(capsys, saved / "legacy.pt", tmp_path / "encoder")
    assert code == 0, err
    _assert_same(
        load_file(tmp_path / "encoder" / "model.safetensors"), _reference(saved / "whole_state_dict.pt")
    )


def test_state_dicts_plain_pickles_and_wrappers(saved, tmp_path):
    want = _reference(saved / "whole_state_dict.pt")
    _assert_same(read_pickled(saved / "whole_state_dict.pt")[0], want)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(dict(want)))  # storages pickled on their own (_load_from_bytes)
    _assert_same(read_pickled(plain)[0], want)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": want, "epoch": 3}, wrapped)
    tensors, what = read_pickled(wrapped)
    _assert_same(tensors, want)
    assert what == "a state dict under 'state_dict'"


def test_the_merge_command_reads_converted_files(saved, tmp_path, capsys):
    for name in ("whole", "tuned"):
        assert convert(capsys, saved / f"{name}.pt", tmp_path / f"{name}.safetensors")[0] == 0
    args = ["merge", "--base", tmp_path / "whole.safetensors", "--models", tmp_path / "tuned.safetensors"]
    args += ["--method", "task_arithmetic", "--lambda", "0.5", "--out", tmp_path / "merged"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base, tuned = _reference(saved / "whole_state_dict.pt"), _reference(saved / "tuned_state_dict.pt")
    for name, value in base.items():
        if value.is_floating_point():
            expected = (value.float() + 0.5 * (tuned[name].float() - value.float())).to(value.dtype)
            assert torch.allclose(merged[name].float(), expected.float(), atol=1e-6, rtol=1e-2), name
        else:
            assert torch.equal(merged[name], value), name


class Payload:
    """Unpickling this the usual way runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class Evaluates:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle", "legacy"])
def test_a_hostile_pickle_is_refused_and_nothing_runs(tmp_path, capsys, container):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    payload = {"weight": torch.ones(2), "extra": Payload(marker)}
    if container == "torch_zip":
        torch.save(payload, evil)
    elif container == "legacy":
        torch.save(payload, evil, _use_new_zipfile_serialization=False)
    else:
        evil.write_bytes(pickle.dumps(Payload(marker)))
    out = tmp_path / "out.safetensors"
    if container == "torch_zip":  # once as a program: exit status and stderr as a user sees them
        result = run_cli("convert", evil, out)
        code, err = result.returncode, result.stderr
    else:
        code, _, err = convert(capsys, evil, out)
    assert code == 2
    assert err == (
        f"error: {evil}: refuses to rebuild '{os.system.__module__}.system': the file calls it, and only "
        "tensor constructors and classes of model code are rebuilt (nothing in the file was run)\n"
    )
    assert not marker.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_eval_is_refused_by_name(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evaluates()}, evil)
    with pytest.raises(CheckpointError, match=r"refuses to rebuild 'builtins\.eval'"):
        read_pickled(evil)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some text, not a checkpoint", "neither a PyTorch checkpoint nor a pickle"),
        (b"", "neither a PyTorch checkpoint nor a pickle"),
        (None, "not a readable pickled checkpoint: a zip file that is truncated or corrupt"),
    ],
    ids=["text", "empty", "truncated_zip"],
)
def test_unreadable_files_are_one_line_errors(saved, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.pt"
    if content is None:
        whole = (saved / "whole.pt").read_bytes()
        content = whole[: len(whole) // 2]
    bad.write_bytes(content)
    code, _, err = convert(capsys, bad, tmp_path / "out")
    assert code == 2
    assert err.startswith(f"error: {bad}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(saved, tmp_path, capsys):
    out = tmp_path / "encoder.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = convert(capsys, saved / "whole.pt", out)
    assert code == 2
    assert err == f"error: {out}: the output exists; pass --overwrite to replace it\n"
    assert out.read_bytes() == b"keep me"
    assert convert(capsys, saved / "whole.pt", out, "--overwrite")[0] == 0
    assert "attn_mask" in load_file(out)


def test_a_module_tree_that_loops_is_refused(tmp_path):
    """A crafted file whose module contains itself: refused, not an endless walk."""
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    module._modules["again"] = module
    path = tmp_path / "loop.pt"
    torch.save(module, path)
    with pytest.raises(CheckpointError, match="loops or nests too deep"):
        read_pickled(path)


def test_a_pickled_transformers_clip_model(tmp_path):
    """A whole ``transformers`` CLIPModel (config object, nested towers, non-persistent buffers)."""
    transformers = __import__("transformers")
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        text_config={**tower, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1},
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    torch.save(model, tmp_path / "clip.pt")
    tensors, what = read_pickled(tmp_path / "clip.pt")
    assert what == "a pickled module 'transformers.models.clip.modeling_clip.CLIPModel'"
    _assert_same(tensors, model.state_dict())


def test_a_tensor_larger_than_its_bytes_is_refused(tmp_path):
    """Zero strides make a view bigger than its storage; written out, a small file could fill a disk."""
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(1000)}, path)
    with pytest.raises(CheckpointError, match=r"1000 elements views a storage of 1 \(overlapping strides\)"):
        read_pickled(path)
