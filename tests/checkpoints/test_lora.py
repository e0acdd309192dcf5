"""PEFT LoRA adapters as task vectors, checked against PEFT's own ``merge_and_unload``; ``--out-lora``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import weightweaving
from tests.helpers import run_cli
from tests.llm import fine_tune, llama, transformers
from weightweaving.cli import main
from weightweaving.errors import CheckpointError, OptionError

peft = pytest.importorskip("peft")


def _adapter(tmp_path, name: str, seed: int, model=None, **config) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter with random non-zero updates on the base at tmp_path/base; return PEFT's
    own merged state dict (``merge_and_unload``)."""
    model = (
        model if model is not None else transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    )
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # lora_A, lora_B (zero at init), modules_to_save copies
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / name)
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


@pytest.fixture()
def base(tmp_path):
    model = llama(0, tied=False)
    model.save_pretrained(tmp_path / "base")
    return {k: v.clone() for k, v in model.state_dict().items()}


def _close(got, want, atol=1e-6):
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=atol), name


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        {
            "r": 4,
            "lora_alpha": 6,
            "use_rslora": True,
            "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"layers.1.mlp.down_proj": 3},
            "modules_to_save": ["lm_head"],
        },
    ],
    ids=["plain", "rslora-patterns-embedding-modules_to_save"],
)
def test_one_adapter_merged_alone_equals_peft_merge_and_unload(tmp_path, base, config):
    want = _adapter(tmp_path, "ad", seed=1, **config)
    got = weightweaving.merge(tmp_path / "base", [tmp_path / "ad"], "task_arithmetic", 1.0)
    _close(got, want)


def test_fan_in_fan_out_adapter_on_gpt2(tmp_path):
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    want = _adapter(
        tmp_path, "ad", seed=2, model=model, r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True
    )
    got = weightweaving.merge(tmp_path / "base", [tmp_path / "ad"], "task_arithmetic", 1.0)
    for name, value in got.items():
        assert torch.allclose(value, want[name], atol=1e-6), name


def test_two_adapters_merge_with_ties_and_weave_as_their_full_models(tmp_path, base):
    full_a = _adapter(tmp_path, "a", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    full_b = _adapter(tmp_path, "b", seed=4, r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"])
    adapters = [tmp_path / "a", tmp_path / "b"]
    got = weightweaving.merge(tmp_path / "base", adapters, "ties", 1.0, k=0.3)
    _close(got, weightweaving.merge(base, [full_a, full_b], "ties", 1.0, k=0.3))
    woven = weightweaving.weave(tmp_path / "base", adapters, "ties", lambdas=[0.5, 1.0], k=0.3)
    _close(woven, weightweaving.weave(base, [full_a, full_b], "ties", lambdas=[0.5, 1.0], k=0.3))


def test_adapter_mixes_with_a_full_fine_tune(tmp_path, base):
    full_a = _adapter(tmp_path, "a", seed=5, r=4, lora_alpha=8, target_modules=["q_proj"])
    tuned = llama(0, tied=False)
    full_b = fine_tune(tuned, seed=6)
    tuned.save_pretrained(tmp_path / "ft")
    got = weightweaving.merge(tmp_path / "base", [tmp_path / "a", tmp_path / "ft"], "task_arithmetic", 0.5)
    _close(got, weightweaving.merge(base, [full_a, full_b], "task_arithmetic", 0.5))


def test_out_lora_at_full_rank_reproduces_the_merge_and_loads_with_peft(tmp_path, base):
    _adapter(tmp_path, "a", seed=7, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _adapter(tmp_path, "b", seed=8, r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    adapters = [tmp_path / "a", tmp_path / "b"]
    want = weightweaving.merge(tmp_path / "base", adapters, "ties", 1.0, k=0.5)
    out = tmp_path / "lora"
    res = run_cli(
        "merge", "--base", tmp_path / "base", "--models", *adapters, "--method", "ties", "--set", "k=0.5",
        "--lambda", "1", "--out-lora", "16", "--out", out,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "keeps 100.0000% of the merged updates' energy" in res.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    assert len(config["target_modules"]) == 2 * 3  # q, v, o of both layers: only what the adapters change
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    for name, value in want.items():
        assert torch.allclose(merged[name], value, atol=1e-5), name
    record = yaml.safe_load((out / "weightweaving_config.yaml").read_text())
    assert record["out_lora"]["energy_kept"] == pytest.approx(1.0)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "rank 16" in card


def test_out_lora_low_rank_reports_the_energy_kept(tmp_path, base):
    tuned = llama(0, tied=False)
    full = fine_tune(tuned, seed=9)
    tuned.save_pretrained(tmp_path / "ft")
    out = weightweaving.merge(
        tmp_path / "base", [tmp_path / "ft"], "task_arithmetic", 1.0, out=tmp_path / "lora", out_lora=3
    )
    record = yaml.safe_load((out / "weightweaving_config.yaml").read_text())
    kept = total = 0.0
    for name, value in base.items():
        if value.dim() != 2:
            continue
        delta = full[name] - value
        if "embed_tokens" in name:
            delta = delta.T
        s = torch.linalg.svdvals(delta.double()) ** 2
        module = name.removesuffix(".weight")
        assert record["out_lora"]["energy_kept_per_module"][module] == pytest.approx(
            float(s[:3].sum() / s.sum()), rel=1e-4
        )
        kept, total = kept + float(s[:3].sum()), total + float(s.sum())
    assert record["out_lora"]["energy_kept"] == pytest.approx(kept / total, rel=1e-4)
    assert record["left_out"]["not a weight matrix (--out-lora)"]  # the norms' changes cannot be LoRA
    # PEFT applies exactly the low-rank updates written, to every matrix (the embedding included)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    applied = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    for name, value in base.items():
        module = "base_model.model." + name.removesuffix(".weight")
        if value.dim() != 2:
            assert torch.equal(applied[name], value), name
        elif "embed_tokens" in name:
            update = adapter[module + ".lora_embedding_B"] @ adapter[module + ".lora_embedding_A"]
            assert torch.allclose(applied[name], value + update.T, atol=1e-6), name
        else:
            update = adapter[module + ".lora_B.weight"] @ adapter[module + ".lora_A.weight"]
            assert torch.allclose(applied[name], value + update, atol=1e-6), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "'use_dora: true' is not supported"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported; only LoRA adapters can be merged"),
        ({"r": 0}, "'r' must be a positive number, got 0"),
    ],
)
def test_unsupported_adapters_are_refused_in_one_line(tmp_path, base, change, message):
    _adapter(tmp_path, "ad", seed=1, r=2, lora_alpha=2, target_modules=["q_proj"])
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CheckpointError) as err:
        weightweaving.merge(tmp_path / "base", [tmp_path / "ad"])
    assert str(err.value) == f"{path}: {message}"


def test_an_adapter_needs_a_base(tmp_path, base, capsys):
    _adapter(tmp_path, "ad", seed=1, r=2, lora_alpha=2, target_modules=["q_proj"])
    args = [
        "merge",
        "--base",
        str(tmp_path / "ad"),
        "--models",
        str(tmp_path / "ad"),
        "--out",
        str(tmp_path / "o"),
    ]
    capsys.readouterr()  # transformers' loading bars
    assert main(args) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'ad'}: is a LoRA adapter; it can only be merged on top of a base (--base)\n"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"out_lora": 4}, "--out-lora needs an output folder (--out)"),
        ({"out_lora": 0, "out": "o"}, "--out-lora 0 must be a rank >= 1"),
        (
            {"out_lora": 4, "out": "o", "shard_size": "1GB"},
            "--out-lora writes one adapter file; --shard-size does not apply",
        ),
    ],
)
def test_out_lora_option_errors(options, message):
    with pytest.raises(OptionError) as err:
        weightweaving.merge({"w.weight": torch.zeros(2, 2)}, [{"w.weight": torch.ones(2, 2)}], **options)
    assert str(err.value) == message


def test_out_lora_of_a_weave_reproduces_the_woven_updates(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(6, 4, generator=gen), "b.weight": torch.randn(3, 5, generator=gen)}
    tuned = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    woven = weightweaving.weave(base, tuned, "ties", lambdas=[0.5, 1.0], k=0.5)
    out = weightweaving.weave(base, tuned, "ties", lambdas=[0.5, 1.0], k=0.5, out=tmp_path / "o", out_lora=5)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    for name in base:
        module = "base_model.model." + name.removesuffix(".weight")
        update = adapter[module + ".lora_B.weight"] @ adapter[module + ".lora_A.weight"]
        assert torch.allclose(base[name] + update, woven[name], atol=1e-5), name
