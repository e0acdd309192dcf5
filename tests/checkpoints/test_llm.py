"""Language-model folders: sharded in and out, tokenizer and configs carried, tied embeddings, added tokens."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import weightweaving
from tests.helpers import load_folder, run_cli, save_hf_folder
from tests.llm import VOCAB, fine_tune, llama, save_tokenizer, transformers

CARRIED = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]


def _models(tmp_path, tied: bool, n: int = 2):
    """A sharded base with a tokenizer and a README, and ``n`` sharded fine-tunes; their state dicts."""
    base = llama(0, tied)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    save_tokenizer(tmp_path / "base")
    (tmp_path / "base" / "README.md").write_text("the base's own card\n")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = []
    for i in range(n):
        model = llama(0, tied)
        tuned.append(fine_tune(model, seed=10 + i))
        model.save_pretrained(tmp_path / f"ft{i}", max_shard_size="20KB")
    return base_sd, tuned


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_llama_merges_reloads_and_keeps_the_base_files(tmp_path, tied):
    base_sd, tuned = _models(tmp_path, tied)
    assert (tmp_path / "ft0" / "model.safetensors.index.json").exists()  # the inputs are sharded
    out = weightweaving.merge(
        tmp_path / "base",
        [tmp_path / "ft0", tmp_path / "ft1"],
        "task_arithmetic",
        0.5,
        out=tmp_path / "merged",
        shard_size="10KB",
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the output is sharded too
    for name in CARRIED:
        assert (out / name).read_bytes() == (tmp_path / "base" / name).read_bytes(), name
    assert "the base's own card" not in (out / "README.md").read_text()  # our card replaces it
    stored = load_folder(out)
    assert ("lm_head.weight" in stored) is (not tied)  # one tensor when the base ties them
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    got = loaded.state_dict()
    for name, value in base_sd.items():
        want = value + 0.5 * sum(sd[name] - value for sd in tuned)
        assert torch.allclose(got[name], want, atol=1e-6), name
    if tied:
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w1 w7")["input_ids"] == [4, 10]
    assert tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False) == "w1 "
    ids = torch.tensor([[1, 4, 10]])
    assert loaded(input_ids=ids).logits.shape == (1, 3, VOCAB)


def test_cli_merges_a_sharded_llama_folder(tmp_path):
    base_sd, tuned = _models(tmp_path, tied=True)
    out = tmp_path / "merged"
    res = run_cli(
        "merge", "--base", tmp_path / "base", "--models", tmp_path / "ft0", tmp_path / "ft1",
        "--method", "ties", "--set", "k=0.5", "--lambda", "1", "--shard-size", "10KB", "--out", out,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    # the same merge on the state dicts, without the tied head (a view of the embedding, not stored)
    base_sd, *tuned = ({k: v for k, v in sd.items() if k != "lm_head.weight"} for sd in [base_sd, *tuned])
    want = weightweaving.merge(base_sd, tuned, "ties", 1.0, k=0.5)
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name in load_folder(out):
        assert torch.allclose(got[name], want[name], atol=1e-6), name


def _tied_base(tmp_path):
    base = llama(0, tied=True)
    base.save_pretrained(tmp_path / "base")
    return {k: v.clone() for k, v in base.state_dict().items() if k != "lm_head.weight"}


def test_finetune_that_untied_its_head_over_a_tied_base_stays_tied(tmp_path, caplog):
    base_sd = _tied_base(tmp_path)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    ft = {k: v + 0.01 for k, v in base_sd.items()}
    ft["lm_head.weight"] = ft["model.embed_tokens.weight"] + 1.0  # untied in fine-tuning
    save_hf_folder(tmp_path / "ft", ft, config)
    copy = dict(ft, **{"lm_head.weight": ft["model.embed_tokens.weight"].clone()})  # stores a duplicate
    save_hf_folder(tmp_path / "dup", copy, config)
    out = weightweaving.merge(
        tmp_path / "base", [tmp_path / "ft", tmp_path / "dup"], "task_arithmetic", 1.0, out=tmp_path / "m"
    )
    stored = load_folder(out)
    assert "lm_head.weight" not in stored
    want = base_sd["model.embed_tokens.weight"] + 0.02
    assert torch.allclose(stored["model.embed_tokens.weight"], want, atol=1e-6)
    notes = " ".join(yaml.safe_load((out / "weightweaving_config.yaml").read_text())["notes"])
    assert "ignored 'lm_head.weight', which differs from 'model.embed_tokens.weight' (untied in" in notes
    assert "ignored 'lm_head.weight', a copy of 'model.embed_tokens.weight' (the base ties them" in notes


def test_tied_finetune_over_an_untied_base_reads_its_embedding_as_its_head(tmp_path):
    base = llama(0, tied=False)
    base.save_pretrained(tmp_path / "base")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    ft = {k: v + 0.01 for k, v in base_sd.items() if k != "lm_head.weight"}
    save_hf_folder(tmp_path / "ft", ft)
    got = weightweaving.merge(tmp_path / "base", [tmp_path / "ft"], "task_arithmetic", 1.0)
    assert torch.allclose(got["lm_head.weight"], ft["model.embed_tokens.weight"], atol=1e-6)


def test_added_tokens_are_refused_by_default_and_cut_with_vocab_base(tmp_path):
    base = llama(0, tied=False)
    base.save_pretrained(tmp_path / "base")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    bigger = llama(1, tied=False, vocab=VOCAB + 3)  # three added tokens
    big_sd = fine_tune(bigger, seed=5)
    bigger.save_pretrained(tmp_path / "ft_big")
    same = llama(0, tied=False)
    same_sd = fine_tune(same, seed=6)
    same.save_pretrained(tmp_path / "ft")
    out = tmp_path / "merged"
    args = [
        "merge",
        "--base",
        tmp_path / "base",
        "--models",
        tmp_path / "ft",
        tmp_path / "ft_big",
        "--out",
        out,
    ]
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr == (
        f"error: {tmp_path / 'ft_big' / 'model.safetensors'}: parameter 'lm_head.weight' has a vocabulary of "
        f"{VOCAB + 3} tokens, the base {VOCAB} (added tokens); pass --vocab base to merge the {VOCAB} rows "
        "all models share and keep the base's size\n"
    )
    assert not out.exists()
    weightweaving.merge(
        tmp_path / "base", [tmp_path / "ft", tmp_path / "ft_big"], lam=0.5, vocab="base", out=out
    )
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in base_sd.items():
        big = big_sd[name][:VOCAB] if big_sd[name].shape != value.shape else big_sd[name]
        want = value + 0.5 * ((same_sd[name] - value) + (big - value))
        assert torch.allclose(got[name], want, atol=1e-6), name
    assert yaml.safe_load((out / "weightweaving_config.yaml").read_text())["vocab"] == "base"


def test_integer_buffers_are_copied_from_the_base(tmp_path):
    base = {"w.weight": torch.zeros(3, 2), "pos_ids": torch.arange(5)}
    ft = {"w.weight": torch.ones(3, 2), "pos_ids": torch.arange(5) + 7}
    save_hf_folder(tmp_path / "base", base)
    save_hf_folder(tmp_path / "ft", ft)
    out = weightweaving.merge(
        tmp_path / "base", [tmp_path / "ft"], "task_arithmetic", 1.0, out=tmp_path / "m"
    )
    stored = load_folder(out)
    assert stored["pos_ids"].dtype == torch.int64 and torch.equal(stored["pos_ids"], base["pos_ids"])
    assert torch.equal(stored["w.weight"], ft["w.weight"])


def test_rows_are_read_from_the_start_of_a_tensor_only(tmp_path):
    from weightweaving.checkpoints import open_checkpoint

    sd = {"emb.weight": torch.randn(7, 3), "b": torch.randn(4)}
    save_hf_folder(tmp_path / "m", sd)
    ckpt = open_checkpoint(tmp_path / "m")
    assert torch.equal(ckpt.get_rows("emb.weight", 5), sd["emb.weight"][:5])
    assert torch.equal(ckpt.get_rows("b", 2), sd["b"][:2])
