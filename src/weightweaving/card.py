"""The model card (``README.md``) every output folder carries, in the Hugging Face format.

YAML front matter (``base_model``, ``library_name``, ``tags``) and then what a reader needs to trust
and reproduce the merge: the method with its paper and reference code, the models merged and the exact
provenance config.
"""

from __future__ import annotations

from typing import Any

import yaml

# method -> (paper, reference code); methods without an entry are described by name only.
REFERENCES: dict[str, tuple[str, str]] = {
    "weight_averaging": (
        "Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482",
        "https://github.com/mlfoundations/model-soups",
    ),
    "task_arithmetic": (
        "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089",
        "https://github.com/mlfoundations/task_vectors",
    ),
    "ties": (
        "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708",
        "https://github.com/prateeky2806/ties-merging",
    ),
    "dare": (
        "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099",
        "https://github.com/yule-BUAA/MergeLM",
    ),
    "breadcrumbs": (
        "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795",
        "https://github.com/rezazzr/breadcrumbs",
    ),
    "magmax": (
        "Marczak et al., MagMax, ECCV 2024, arXiv:2407.06322",
        "https://github.com/danielm1405/magmax",
    ),
    "pcb": (
        "Du et al., Parameter Competition Balancing, NeurIPS 2024, arXiv:2410.02396",
        "https://github.com/duguodong7/pcb-merging",
    ),
    "tsv": (
        "Gargiulo et al., Task Singular Vectors, CVPR 2025, arXiv:2412.00081",
        "https://github.com/AntoAndGar/task_singular_vectors",
    ),
    "iso_c": (
        "Marczak et al., No Task Left Behind (Iso-C), ICML 2025, arXiv:2502.04959",
        "https://github.com/danielm1405/iso-merging",
    ),
    "iso_cts": (
        "Marczak et al., No Task Left Behind (Iso-CTS), ICML 2025, arXiv:2502.04959",
        "https://github.com/danielm1405/iso-merging",
    ),
    "cart": (
        "Choi et al., Revisiting Weight Averaging for Model Merging, arXiv:2412.12153",
        "https://github.com/JH-GEECS/CART",
    ),
    "slerp": (
        "Shoemake, Animating Rotation with Quaternion Curves, SIGGRAPH 1985",
        "https://github.com/arcee-ai/mergekit",
    ),
    "model_stock": (
        "Jang et al., Model Stock, ECCV 2024, arXiv:2403.19522",
        "https://github.com/naver-ai/model-stock",
    ),
}
WEAVING = (
    "Chaves, Valle & Avila, Weight Weaving, NeurIPS 2025 UniReps, arXiv:2510.13921",
    "https://github.com/VirtualSpaceman/weight_weaving",
)
TAGS = ["merge", "weightweaving"]


def _reference(name: str) -> str:
    paper, code = REFERENCES.get(name, ("", ""))
    return f" — {paper}; reference code: {code}" if paper else ""


def model_card(
    record: dict[str, Any], config_text: str, *, base_model: str, library_name: str | None, title: str
) -> str:
    """The text of ``README.md`` for an output folder.

    Args:
        record: the provenance record (``weightweaving_config.yaml`` as a mapping).
        base_model: the base's folder (or file, or name).
        config_text: that file's exact text, embedded so the card alone reproduces the merge.
        library_name: ``transformers``, ``peft`` or ``None`` when unknown.
        title: the card's heading (the output folder's name).
    """
    front: dict[str, Any] = {"base_model": base_model}
    if library_name:
        front["library_name"] = library_name
    front["tags"] = TAGS
    method = str(record.get("method"))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += [
        "This model was made with [weightweaving](https://pypi.org/project/weightweaving/), data-free "
        "merging of fine-tuned models into their pre-trained base.",
        "",
        "## Method",
        "",
        f"- `{method}`{_reference(method)}",
    ]
    if record.get("operation") == "weave":
        weave = record.get("weave") or {}
        lines.append(
            f"- woven with Weight Weaving (pool `{weave.get('pool')}` over `{weave.get('pool_over')}`)"
            f" — {WEAVING[0]}; reference code: {WEAVING[1]}"
        )
    elif record.get("lambda") is not None:
        lines.append(f"- λ = {record['lambda']}")
    out_lora = record.get("out_lora")
    if isinstance(out_lora, dict):
        lines.append(
            f"- written as a LoRA adapter of rank {out_lora.get('rank')} (truncated SVD of each merged "
            f"update), keeping {out_lora.get('energy_kept', 0.0):.4%} of the updates' energy"
        )
    lines += ["", "## Models merged", "", f"- base: `{base_model}`"]
    lines += [f"- `{m}`" for m in record.get("models") or []]
    lines += [
        "",
        "## Configuration",
        "",
        "The provenance file `weightweaving_config.yaml`, which reproduces this merge:",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
