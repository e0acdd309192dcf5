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


def image_folder(root: Path, per_class: int = 6, seed: int = 0, size: int = 40) -> Path:
    """One sub-folder per colour; each image a coloured square on a grey field, at a random place."""
    gen = torch.Generator().manual_seed(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), (128, 128, 128))
            x, y = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
            side = size // 3 + int(torch.randint(0, size // 4, (1,), generator=gen))
            img.paste(colour, (x, y, x + side, y + side))
            img.save(root / name / f"{i}.png")
    return root
