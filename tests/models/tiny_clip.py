"""A tiny random CLIP (vision + text, tokenizer, image processor) and tiny image folders, built locally."""

from __future__ import annotations

import json
from pathlib import Path

import torch

transformers = __import__("transformers")
Image = __import__("PIL.Image", fromlist=["Image"])

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _byte_alphabet() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def write_tokenizer(folder: Path) -> int:
    """A byte-level CLIP BPE with no merges (every character a token); returns the vocabulary size."""
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(str(folder))
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    return len(vocab)


def tiny_clip_folder(folder: Path, seed: int = 0) -> Path:
    """A random ``CLIPModel`` folder: hidden 32, 2 layers, 32x32 images, 8x8 patches."""
    vocab = write_tokenizer(folder)
    config = transformers.CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": vocab,
            "max_position_embeddings": 77,
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    model.save_pretrained(str(folder))
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(str(folder))
    return folder


def image_folder(root: Path, per_class: int = 6, seed: int = 0, size: int = 40, kind: str = "colour") -> Path:
    """Tiny labelled images on a grey field, one sub-folder per class.

    kind ``colour``: a red, green or blue square at a random place; ``place``: a white square in the
    left or right half; ``shape``: a yellow square or a yellow cross.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> int:
        return int(torch.randint(0, max(1, n), (1,), generator=gen))

    classes = {"colour": list(COLOURS), "place": ["left", "right"], "shape": ["cross", "square"]}[kind]
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), (128, 128, 128))
            side = size // 3 + rand(size // 6)
            x, y = rand(size - side), rand(size - side)
            if kind == "colour":
                img.paste(COLOURS[name], (x, y, x + side, y + side))
            elif kind == "place":
                x = rand(size // 2 - side) + (size // 2 if name == "right" else 0)
                img.paste((255, 255, 255), (x, y, x + side, y + side))
            elif name == "square":
                img.paste((240, 220, 0), (x, y, x + side, y + side))
            else:
                bar = max(2, side // 4)
                img.paste((240, 220, 0), (x, y + (side - bar) // 2, x + side, y + (side + bar) // 2))
                img.paste((240, 220, 0), (x + (side - bar) // 2, y, x + (side + bar) // 2, y + side))
            img.save(root / name / f"{i}.png")
    return root
