"""Build the mergekit reference cases in ``tests/data/mergekit/`` (run by hand, never by the tests).

Tiny seeded Llama models (2 layers, hidden 16, vocab 32; config.json from ``transformers.LlamaConfig``)
are saved as safetensors folders, and mergekit itself merges them on one config per case. The
inputs, the configs and mergekit's outputs are stored; ``tests/test_mergekit_configs.py`` runs our
``merge`` on each config and compares. mergekit is a peer, never our dependency: run this with the
Python of a separate environment that has it (``pip install torch==2.13.0 mergekit==0.1.5``)::

    /work/peers-i22a/venv/bin/python scripts/make_mergekit_cases.py

Nothing here contains or imports mergekit's code: it runs the ``mergekit-yaml`` command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "mergekit"

FP32 = {"base": "models/base", "a": "models/ft_a", "b": "models/ft_b", "c": "models/ft_c"}
BF16 = {"base": "models/base_bf16", "a": "models/ft_a_bf16", "b": "models/ft_b_bf16"}


def llama_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a LlamaForCausalLM with untied embeddings, by its Hugging Face name."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def save_model(
    folder: Path, tensors: dict[str, torch.Tensor], config: LlamaConfig, dtype: torch.dtype
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config.dtype = str(dtype).removeprefix("torch.")
    config.to_json_file(str(folder / "config.json"))


def build_models() -> None:
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    gen = torch.Generator().manual_seed(22)
    shapes = llama_shapes(config)
    base = {name: torch.randn(shape, generator=gen) * 0.5 for name, shape in shapes.items()}
    for name in base:
        if name.endswith("norm.weight"):
            base[name] = 1 + 0.1 * base[name]
    # fine-tunes: shared direction plus model noise, so signs partly agree (TIES) and cosines are > 0
    shared = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}
    tuned = {
        key: {
            name: base[name] + shared[name] + 0.03 * torch.randn(s, generator=gen)
            for name, s in shapes.items()
        }
        for key in ("a", "b", "c")
    }
    for key, sd in [("base", base), *tuned.items()]:
        save_model(DATA / FP32[key], sd, config, torch.float32)
        if key in BF16:
            save_model(DATA / BF16[key], sd, config, torch.bfloat16)


def model(key: str, params: dict | None = None, bf16: bool = False) -> dict:
    entry: dict = {"model": f"../{(BF16 if bf16 else FP32)[key]}"}
    if params:
        entry["parameters"] = params
    return entry


def cases() -> dict[str, dict]:
    gta_models = [model("a", {"weight": 1.0}), model("b", {"weight": 0.5}), model("c", {"weight": 0.3})]
    return {
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": "../models/base",
            "models": gta_models,
            "parameters": {"lambda": 0.8},
            "dtype": "float32",
        },
        "task_arithmetic_normalize_gradient": {
            "merge_method": "task_arithmetic",
            "base_model": "../models/base",
            "models": [model("a", {"weight": [0.2, 1.0]}), model("b", {"weight": 0.7})],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": "../models/base",
            "models": [
                model("a", {"weight": 1.0, "density": 0.5}),
                model("b", {"weight": 0.8, "density": 0.7}),
                model("c", {"weight": 0.6, "density": 0.3}),
            ],
            "parameters": {"int8_mask": True},
            "dtype": "float32",
        },
        "ties_no_normalize_lambda_out_bf16": {
            "merge_method": "ties",
            "base_model": "../models/base",
            "models": gta_models,
            "parameters": {"density": 0.4, "normalize": False, "lambda": 1.3},
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
        "ties_bf16": {
            "merge_method": "ties",
            "base_model": "../models/base_bf16",
            "models": [model("a", {"weight": 1.0}, True), model("b", {"weight": 0.7}, True)],
            "parameters": {"density": 0.5},
            "dtype": "bfloat16",
        },
        "task_arithmetic_bf16_stored_out_fp32": {  # no dtype: mergekit works in the checkpoints' bf16
            "merge_method": "task_arithmetic",
            "base_model": "../models/base_bf16",
            "models": [model("a", {"weight": 0.7}, True), model("b", {"weight": 0.45}, True)],
            "parameters": {"lambda": 1.1},
            "out_dtype": "float32",
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": "../models/base",
            "models": gta_models,
            "parameters": {"density": 0.6, "gamma": 0.05},
            "dtype": "float32",
        },
        "breadcrumbs_ties_rescale": {
            "merge_method": "breadcrumbs_ties",
            "base_model": "../models/base",
            "models": [
                model("a", {"weight": 1.0, "density": 0.5, "gamma": 0.02}),
                model("b", {"weight": 1.0, "density": 0.7, "gamma": 0.1}),
            ],
            "parameters": {"rescale": True},
            "dtype": "float32",
        },
        "linear": {
            "merge_method": "linear",
            "models": [
                model("base", {"weight": 2.0}),
                model("a", {"weight": 1.0}),
                model("b", {"weight": 0.5}),
            ],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": "../models/base",
            "models": [model("base"), model("a")],
            "parameters": {"t": 0.3},
            "dtype": "float32",
        },
        "slerp_gradient": {
            "merge_method": "slerp",
            "base_model": "../models/base",
            "models": [model("base"), model("b")],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 0.5]},
                    {"filter": "mlp", "value": [1.0, 0.2]},
                    {"value": 0.6},
                ]
            },
            "dtype": "float32",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": "../models/base",
            "models": [model("a"), model("b"), model("c")],
            "dtype": "float32",
        },
        "model_stock_filter_wise": {
            "merge_method": "model_stock",
            "base_model": "../models/base",
            "models": [model("a"), model("b")],
            "parameters": {"filter_wise": True},
            "dtype": "float32",
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": "../models/base",
            "models": [
                model("a", {"weight": 1.0, "density": 0.5}),
                model("b", {"weight": 1.0, "density": 0.5}),
            ],
            "dtype": "float32",
        },
        "dare_linear": {
            "merge_method": "dare_linear",
            "base_model": "../models/base",
            "models": [
                model("a", {"weight": 0.6, "density": 0.3}),
                model("b", {"weight": 0.4, "density": 0.3}),
            ],
            "dtype": "float32",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-yaml", default=str(Path(sys.executable).parent / "mergekit-yaml"))
    args = parser.parse_args()
    if DATA.exists():
        shutil.rmtree(DATA)
    build_models()
    for name, config in cases().items():
        folder = DATA / name
        folder.mkdir(parents=True)
        (folder / "mergekit.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        work = folder / "_mergekit_out"
        subprocess.run(
            [
                args.mergekit_yaml,
                str(folder / "mergekit.yaml"),
                str(work),
                "--no-copy-tokenizer",
                "--no-write-model-card",
                "--random-seed",
                "0",
                "--quiet",
            ],
            check=True,
            cwd=folder,  # mergekit resolves relative model paths from the working directory
        )
        shards = sorted(work.glob("*.safetensors"))
        if len(shards) != 1:
            raise SystemExit(f"{name}: expected one output file, got {shards}")
        shards[0].rename(folder / "expected.safetensors")
        shutil.rmtree(work)
        print(f"{name}: ok")
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    (DATA / "README.md").write_text(
        "Reference outputs of mergekit 0.1.5 on tiny Llama models, made by "
        "`scripts/make_mergekit_cases.py` (run with a separate environment that has mergekit). "
        "Each case folder holds the unchanged mergekit config and mergekit's output "
        f"(`expected.safetensors`). Total {total / 1e6:.2f} MB.\n"
    )
    print(json.dumps({"cases": len(cases()), "bytes": total}))


if __name__ == "__main__":
    main()
