"""CLIP through ``transformers``: model folders, vision-only folders, and open_clip-named state dicts.

Three kinds of checkpoint end up as one ``CLIPModel`` (vision + text):

* a ``CLIPModel`` folder (``config.json`` with ``model_type: clip``): loaded as it is;
* a ``CLIPVisionModel`` folder (``model_type: clip_vision_model``, as FusionBench publishes its
  per-task fine-tunes): its ``vision_model.*`` tensors replace the base's, the text side (and
  ``visual_projection``) come from a base ``CLIPModel`` folder given once;
* a state dict file in open_clip's naming (``visual.transformer.resblocks.N.attn.in_proj_weight``,
  what the task_vectors line of code saves), mapped to Hugging Face names by
  :func:`open_clip_to_hf` without importing open_clip, and loaded into the base likewise.

Importing this module does not import ``transformers``; :func:`load_clip` does.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoints import open_checkpoint
from ..errors import CheckpointError, WeightWeavingError

log = logging.getLogger("weightweaving")

#: what "the image encoder" is: the vision tower and its projection into the joint space
VISION_INCLUDE = (r"^vision_model\.", r"^visual_projection\.")
CLIP_TYPES = ("clip", "clip_vision_model")


def folder_model_type(folder: str | Path) -> str | None:
    """The ``model_type`` in ``folder/config.json``, or None when there is no such file."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"is not a readable JSON config: {exc}", path=config) from None
    return str(value) if value is not None else None


def default_include(source: object) -> list[str] | None:
    """The vision tower's include rule when ``source`` is a ``CLIPModel`` folder, else None.

    A merge of CLIP folders then merges the image encoder only and copies the text side from the base,
    as the paper (and task_vectors) fine-tune and merge image encoders only.
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir() and folder_model_type(source) == "clip":
        return list(VISION_INCLUDE)
    return None


def is_vision_parameter(name: str) -> bool:
    return any(re.search(p, name) for p in VISION_INCLUDE)


# ---------------------------------------------------------------------------------- open_clip names

_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_IGNORED = ("attn_mask",)  # a buffer open_clip saves with the text tower


def looks_open_clip(names: list[str]) -> bool:
    return any(n.endswith("visual.conv1.weight") for n in names)


def open_clip_to_hf(state: Mapping[str, Tensor], *, label: str = "<state dict>") -> dict[str, Tensor]:
    """Rename an open_clip ViT state dict to Hugging Face ``CLIPModel`` names.

    A common prefix before ``visual.`` (``model.`` in task_vectors' ``ImageEncoder``) is dropped;
    each block's fused ``in_proj_weight`` (3·width, width) is split into ``q_proj``/``k_proj``/``v_proj``;
    the projections open_clip stores as ``x @ proj`` (width, embed) become ``nn.Linear`` weights
    (embed, width). A name that has no counterpart is refused rather than dropped.

    Example:
        >>> import torch
        >>> out = open_clip_to_hf({"visual.proj": torch.zeros(4, 2), "visual.conv1.weight": torch.zeros(4, 3, 2, 2)})
        >>> sorted((k, tuple(v.shape)) for k, v in out.items())
        [('vision_model.embeddings.patch_embedding.weight', (4, 3, 2, 2)), ('visual_projection.weight', (2, 4))]
    """
    anchor = next((n for n in state if n.endswith("visual.conv1.weight")), None)
    if anchor is None:
        raise CheckpointError("is not an open_clip ViT state dict (no 'visual.conv1.weight')", path=label)
    prefix = anchor[: -len("visual.conv1.weight")]
    out: dict[str, Tensor] = {}
    for full, tensor in state.items():
        if not full.startswith(prefix):
            raise CheckpointError("does not share the model's prefix", path=label, parameter=full)
        name = full[len(prefix) :]
        if name.endswith(_IGNORED):
            continue
        if name in _TOP:
            out[_TOP[name]] = tensor
        elif name in _TRANSPOSED:
            out[_TRANSPOSED[name]] = tensor.T.contiguous()
        elif match := _BLOCK.match(name):
            tower = "vision_model" if match.group(1) else "text_model"
            out.update(
                _block(f"{tower}.encoder.layers.{match.group(2)}", match.group(3), tensor, label, full)
            )
        else:
            raise CheckpointError(
                "has no counterpart in a Hugging Face CLIP ViT (a ResNet CLIP is not supported)",
                path=label,
                parameter=full,
            )
    return out


def _block(hf: str, part: str, tensor: Tensor, label: str, full: str) -> dict[str, Tensor]:
    if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = part.rsplit("_", 1)[1]  # weight | bias
        q, k, v = tensor.chunk(3, dim=0)  # (3·width, ...) -> three (width, ...)
        return {
            f"{hf}.self_attn.{n}_proj.{kind}": t.contiguous() for n, t in zip("qkv", (q, k, v), strict=True)
        }
    module, _, leaf = part.rpartition(".")
    if module in _BLOCK_PARTS:
        return {f"{hf}.{_BLOCK_PARTS[module]}.{leaf}": tensor}
    raise CheckpointError("has no counterpart in a Hugging Face CLIP block", path=label, parameter=full)


# ------------------------------------------------------------------------------------------ loading


@dataclass
class Clip:
    """A loaded CLIP: the ``transformers`` model, its image processor and tokenizer, and where they came from."""

    model: Any  # transformers.CLIPModel
    processor: Any  # transformers.CLIPImageProcessor
    tokenizer: Any  # a CLIP tokenizer (only heads need it)
    source: str
    base: str | None = None
    replaced: list[str] = field(default_factory=list)  # names taken from ``source`` over the base

    def image_encoder_state(self) -> dict[str, Tensor]:
        """The image encoder's tensors (``vision_model.*``, ``visual_projection.*``), detached on the CPU."""
        return {
            k: v.detach().to("cpu").clone()
            for k, v in self.model.state_dict().items()
            if is_vision_parameter(k)
        }

    def load_image_encoder(self, state: Mapping[str, Tensor]) -> None:
        """Put ``state`` (image-encoder names) into the model in place."""
        _assign(self.model, state, self.source)


def load_clip(model: str | Path, *, base: str | Path | None = None, device: str = "cpu") -> Clip:
    """Load a CLIP model for evaluation or fine-tuning.

    Args:
        model: a ``CLIPModel`` folder, a ``CLIPVisionModel`` folder, or a state dict file (or folder)
            in Hugging Face or open_clip naming.
        base: a ``CLIPModel`` folder giving what ``model`` lacks (text tower, projection, tokenizer,
            image processor); needed for everything but a full ``CLIPModel`` folder.
        device: where the model is put.

    Returns:
        A :class:`Clip` in eval mode.
    """
    transformers = _transformers()
    path = Path(model)
    if not path.exists():
        raise CheckpointError("no such file or folder", path=path)
    kind = folder_model_type(path) if path.is_dir() else None
    if path.is_dir() and kind is not None and kind not in CLIP_TYPES:
        raise CheckpointError(f"is not a CLIP model folder (model_type '{kind}')", path=path / "config.json")
    if kind == "clip":
        clip_model = _from_pretrained(transformers.CLIPModel, path)
        helpers = path if base is None else Path(base)
        processor, tokenizer = (
            _processor(transformers, path, helpers),
            _tokenizer(transformers, path, helpers),
        )
        out = Clip(clip_model, processor, tokenizer, str(path), None if base is None else str(base))
        return _to(out, device)
    if base is None:
        raise CheckpointError(
            "is not a full CLIPModel folder; give the base CLIPModel folder (--base) for its text side",
            path=path,
        )
    base_path = Path(base)
    if folder_model_type(base_path) != "clip":
        raise CheckpointError(
            "is not a CLIPModel folder (config.json with model_type 'clip')", path=base_path
        )
    clip_model = _from_pretrained(transformers.CLIPModel, base_path)
    state, label = _read_state(path)
    if kind == "clip_vision_model":
        # transformers 4 saves CLIPVisionModel as vision_model.*, transformers 5 without the prefix
        state = {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v for k, v in state.items()}
        outside = [k for k in state if not k.startswith("vision_model.")]
        if outside:
            raise CheckpointError("is not a vision-tower parameter", path=label, parameter=outside[0])
    replaced = _assign(clip_model, state, label)
    log.info("%s: %d tensors over the base %s", path, len(replaced), base_path)
    processor = _processor(transformers, path if path.is_dir() else base_path, base_path)
    tokenizer = _tokenizer(transformers, path if path.is_dir() else base_path, base_path)
    return _to(Clip(clip_model, processor, tokenizer, str(path), str(base_path), replaced), device)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:  # pragma: no cover - the extra is missing
        raise WeightWeavingError(
            "CLIP support needs transformers and pillow: pip install 'weightweaving[clip]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our own bars (and one-line errors) only
    return transformers


def _from_pretrained(cls: Any, folder: Path) -> Any:
    try:
        return cls.from_pretrained(str(folder)).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"cannot be loaded as {cls.__name__}: {str(exc).splitlines()[0]}", path=folder
        ) from None


def _read_state(path: Path) -> tuple[dict[str, Tensor], str]:
    ckpt = open_checkpoint(path)
    try:
        state = {k: ckpt.get(k) for k in ckpt.keys()}
    finally:
        ckpt.close()
    label = str(ckpt.label())
    if looks_open_clip(list(state)):
        return open_clip_to_hf(state, label=label), label
    if not any(
        k.startswith(("vision_model.", "visual_projection.", "embeddings.patch_embedding")) for k in state
    ):
        raise CheckpointError(
            "is not a CLIP checkpoint (no vision_model.* or visual.* parameters)", path=label
        )
    return state, label


def _assign(model: Any, state: Mapping[str, Tensor], label: str) -> list[str]:
    """Copy ``state`` into ``model``'s tensors, refusing unknown names and other shapes."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name.endswith("position_ids") and name not in own:
            continue  # a buffer older transformers saved
        if name not in own:
            raise CheckpointError("is not a parameter of the base CLIP model", path=label, parameter=name)
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)} as in the base",
                path=label,
                parameter=name,
            )
    with torch.no_grad():
        for name, tensor in state.items():
            if name in own:
                own[name].copy_(tensor.to(own[name].dtype))
    return [n for n in state if n in own]


def _processor(transformers: Any, folder: Path, fallback: Path) -> Any:
    for candidate in (folder, fallback):
        if (candidate / "preprocessor_config.json").is_file():
            try:
                return transformers.CLIPImageProcessor.from_pretrained(str(candidate))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"unreadable image processor: {exc}", path=candidate) from None
    raise CheckpointError("has no preprocessor_config.json (the image processor)", path=folder)


def _tokenizer(transformers: Any, folder: Path, fallback: Path) -> Any:
    for candidate in (folder, fallback):
        if any((candidate / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            try:
                return transformers.AutoTokenizer.from_pretrained(str(candidate))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"unreadable tokenizer: {exc}", path=candidate) from None
    return None


def _to(clip: Clip, device: str) -> Clip:
    clip.model.to(device)
    return clip
