"""Tiny Llama-style language models and a tokenizer, built locally for the LLM and LoRA tests."""

from __future__ import annotations

from pathlib import Path

import torch

transformers = __import__("transformers")
tokenizers = __import__("tokenizers")

VOCAB = 64
WORDS = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(VOCAB - 3)]]


def llama_config(tied: bool, vocab: int = VOCAB):
    return transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )


def llama(seed: int, tied: bool, vocab: int = VOCAB):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(tied, vocab)).eval()


def save_tokenizer(folder: Path, words: list[str] = WORDS) -> None:
    """A word-level fast tokenizer written from files made here (nothing downloaded)."""
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(folder)


def fine_tune(model, seed: int, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    """Perturb every float parameter: a stand-in for fine-tuning. Returns the new state dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return {k: v.clone() for k, v in model.state_dict().items()}
