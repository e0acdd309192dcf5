"""Paths and sizes: symlinks, unicode and spaces, very long parameter names, tens of thousands of tensors."""

from __future__ import annotations

import time

import torch

from tests.helpers import load_folder, run_cli, save_hf_folder, save_safetensors, toy_models

from .util import assert_error, leftovers, run_cli_many, task_arithmetic


def _assert_merged(out, base, tuned, lam=1.0):
    got = load_folder(out)
    want = task_arithmetic(base, tuned, lam)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_symlinks_unicode_spaces_and_long_names(tmp_path):
    base, tuned = toy_models(2)
    long_name = "encoder." + "très_long_paramètre_名前." * 20 + "weight"  # 400+ characters
    assert len(long_name) > 300
    for sd in (base, *tuned):
        sd[long_name] = sd["ln.weight"] * 2
    # unicode and spaces in every path
    odd = tmp_path / "mödèls ünï 模型" / "with  two spaces"
    b = save_hf_folder(odd / "pre trained", base)
    ms = [save_safetensors(odd / f"fine tuned {i} ✓.safetensors", sd) for i, sd in enumerate(tuned)]
    # symlinks: to a file, to a folder, and an output that is a link
    links = tmp_path / "links"
    links.mkdir()
    (links / "base").symlink_to(b, target_is_directory=True)
    (links / "ft0.safetensors").symlink_to(ms[0])
    target = tmp_path / "real output target"
    (links / "out").symlink_to(target, target_is_directory=True)  # dangling until the merge writes it
    (tmp_path / "earlier merge").mkdir()
    (links / "existing").symlink_to(tmp_path / "earlier merge", target_is_directory=True)  # needs --overwrite
    shape_bad = save_safetensors(odd / "bad ✗.safetensors", {**tuned[1], long_name: torch.ones(3)})
    res = run_cli_many(
        {
            "unicode": ["merge", "--base", b, "--models", *ms, "--out", odd / "merged ✓"],
            "symlinks": [
                "merge",
                "--base",
                links / "base",
                "--models",
                links / "ft0.safetensors",
                ms[1],
                "--out",
                links / "out",
            ],
            "existing_link": ["merge", "--base", b, "--models", *ms, "--out", links / "existing"],
            "link_is_input": [
                "merge",
                "--base",
                links / "base",
                "--models",
                *ms,
                "--out",
                b.parent / "pre trained",
                "--overwrite",
            ],
            "long_name_error": ["merge", "--base", b, "--models", ms[0], shape_bad, "--out", odd / "never"],
        }
    )
    assert res["unicode"].returncode == 0, res["unicode"].stderr
    _assert_merged(odd / "merged ✓", base, tuned)
    assert res["symlinks"].returncode == 0, res["symlinks"].stderr
    assert (links / "out").is_symlink() and target.is_dir()  # written where the link points, link kept
    _assert_merged(target, base, tuned)
    assert_error(
        res["existing_link"],
        f"{links / 'existing'}: the output folder exists; pass --overwrite to replace it",
    )
    assert_error(
        res["link_is_input"],
        f"{b.parent / 'pre trained'}: the output folder is one of the inputs; choose another --out",
    )
    assert_error(
        res["long_name_error"],
        f"{shape_bad}: parameter '{long_name}' has shape (3,), expected (8,) as in the base",
        out=odd / "never",
    )
    assert leftovers(odd) == [] and leftovers(links) == [] and leftovers(tmp_path) == []


def test_tens_of_thousands_of_small_tensors(tmp_path):
    """20,000 tiny tensors: per-tensor overhead must stay small (a few seconds end to end)."""
    gen = torch.Generator().manual_seed(0)
    base = {f"blocks.{i // 10}.p{i % 10}": torch.randn(4, generator=gen) for i in range(20_000)}
    tuned = [{k: v + 0.01 * torch.randn(4, generator=gen) for k, v in base.items()} for _ in range(2)]
    b = save_safetensors(tmp_path / "base.safetensors", base)
    ms = [save_safetensors(tmp_path / f"ft{i}.safetensors", sd) for i, sd in enumerate(tuned)]
    start = time.perf_counter()
    res = run_cli("merge", "--base", b, "--models", *ms, "--lambda", "0.5", "--out", tmp_path / "out")
    seconds = time.perf_counter() - start
    assert res.returncode == 0, res.stderr
    assert seconds < 30, f"{seconds:.1f} s for 20,000 tensors"  # about 3 s on an idle 2-core machine
    _assert_merged(tmp_path / "out", base, tuned, 0.5)
