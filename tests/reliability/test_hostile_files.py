"""Untrusted pickles and malformed safetensors: refused with one line, nothing in them runs."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from tests.helpers import load_folder, run_cli, save_hf_folder, save_safetensors, toy_models

from .util import assert_error, raw_safetensors, run_cli_many, task_arithmetic

REFUSED = "refused: loading it would need full unpickling, which can run code"
ADVICE = "try 'weightweaving convert IN OUT', which reads it without running it"


class Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _pickles(folder, marker):
    base, _ = toy_models(1)
    files = {}
    files["zip_pt"] = folder / "evil.pt"
    torch.save({**base, "extra": Payload(marker)}, files["zip_pt"])  # torch's zip format
    files["raw_bin"] = folder / "evil.bin"
    files["raw_bin"].write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))  # a bare pickle
    files["nested_pt"] = folder / "nested.pth"
    torch.save({"state_dict": base, "optimizer": Payload(marker)}, files["nested_pt"])
    files["no_suffix"] = folder / "weights.data"  # no known suffix: sniffed, still refused
    files["no_suffix"].write_bytes(pickle.dumps(Payload(marker)))
    hf = folder / "hf_evil"
    hf.mkdir()
    torch.save({"w": Payload(marker)}, hf / "pytorch_model.bin")
    (hf / "config.json").write_text("{}")
    files["hf_folder"] = hf
    return files


# name -> (header, data, expected message after "<path>: ")
F32_4 = torch.arange(4, dtype=torch.float32).numpy().tobytes()  # 16 bytes
MALFORMED = {
    "header_too_long": (None, b"", None),  # built by hand below
    "header_not_json": (None, b"", "corrupt safetensors file: the header is not valid JSON"),
    "header_not_object": ([1, 2], b"", "corrupt safetensors file: the header is not a JSON object"),
    "header_deeply_nested": (None, b"", "corrupt safetensors file: the header is not valid JSON"),
    "offsets_out_of_bounds": (
        {"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}},
        F32_4,
        "parameter 'w' data_offsets [0, 400] run past the end of the data (16 bytes): the file is truncated or corrupt",
    ),
    "offsets_negative": (
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}},
        F32_4,
        "parameter 'w' invalid data_offsets [-16, 0]",
    ),
    "offsets_overlap": (
        {
            "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
            "b": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]},
        },
        F32_4,
        "corrupt safetensors file: data of 'a' and 'b' overlap",
    ),
    "unknown_dtype": (
        {"w": {"dtype": "F13", "shape": [4], "data_offsets": [0, 16]}},
        F32_4,
        "parameter 'w' unsupported dtype 'F13'",
    ),
    "dtype_not_a_string": (
        {"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}},
        F32_4,
        "parameter 'w' unsupported dtype '['F32']'",
    ),
    "shape_vs_bytes": (
        {"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}},
        F32_4,
        "parameter 'w' shape (3, 3) of F32 needs 36 bytes but data_offsets span 16",
    ),
    "shape_not_ints": (
        {"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}},
        F32_4,
        "parameter 'w' invalid shape [True, 4]",
    ),
    "entry_incomplete": (
        {"w": {"dtype": "F32", "shape": [4]}},
        F32_4,
        "parameter 'w' corrupt safetensors file: entry lacks dtype, shape or data_offsets",
    ),
    "control_chars_in_name": (  # printed escaped: the error stays one line, no terminal escapes
        {"bad\nname\x1b[2J": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}},
        F32_4,
        "parameter 'bad\\nname\\x1b[2J' unsupported dtype 'F99'",
    ),
    "duplicate_name": (None, F32_4, "parameter 'w' appears twice in the header: the file is corrupt"),
    "truncated": (None, b"", None),  # a real file cut short, built below
    "empty": (None, b"", "not a safetensors file: it is empty"),
    "shorter_than_8": (None, b"", "not a safetensors file: shorter than 8 bytes"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Build every hostile file, run the CLI on each (as a fine-tuned model) in parallel."""
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "PAYLOAD_RAN"
    base, tuned = toy_models(2)
    good_base = save_hf_folder(folder / "base", base)
    good_ft = save_safetensors(folder / "ft0.safetensors", tuned[0])
    files = _pickles(folder, str(marker))
    expected = {name: None for name in files}
    for name, (header, data, message) in MALFORMED.items():
        path = folder / f"{name}.safetensors"
        if name == "header_too_long":
            path.write_bytes((10**6).to_bytes(8, "little") + b'{"w":{}}')
            message = (
                f"corrupt safetensors file: header length 1000000 exceeds the file size {path.stat().st_size}"
            )
        elif name == "header_not_json":
            raw_safetensors(path, None, header_bytes=b"{not json at all" + b" " * 8)
        elif name == "header_deeply_nested":
            raw_safetensors(path, None, header_bytes=b"[" * 100_000 + b"]" * 100_000)
        elif name == "duplicate_name":
            entry = '{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
            raw_safetensors(path, None, data, header_bytes=f'{{"w": {entry}, "w": {entry}}}'.encode())
        elif name == "truncated":
            whole = save_safetensors(
                folder / "whole.safetensors", {"w": torch.arange(16, dtype=torch.float32)}
            )
            path.write_bytes(whole.read_bytes()[:-8])  # cut in the middle of the data
            message = "parameter 'w' data_offsets [0, 64] run past the end of the data (56 bytes): the file is truncated or corrupt"
        elif name == "empty":
            path.write_bytes(b"")
        elif name == "shorter_than_8":
            path.write_bytes(b"\x10\x00\x00")
        else:
            raw_safetensors(path, header, data)
        files[name] = path
        expected[name] = message
    cases = {
        name: ["merge", "--base", good_base, "--models", good_ft, path, "--out", folder / f"out_{name}"]
        for name, path in files.items()
    }
    cases["pickle_as_base"] = [
        "merge",
        "--base",
        files["zip_pt"],
        "--models",
        good_ft,
        "--out",
        folder / "out_pickle_as_base",
    ]
    files["pickle_as_base"] = files["zip_pt"]
    expected["pickle_as_base"] = None
    results = run_cli_many(cases)
    return folder, marker, files, expected, results


PICKLES = ["zip_pt", "raw_bin", "nested_pt", "no_suffix", "hf_folder", "pickle_as_base"]


@pytest.mark.parametrize("name", PICKLES)
def test_hostile_pickle_is_refused_and_never_runs(hostile, name):
    folder, marker, files, _, results = hostile
    shown = files[name] / "pytorch_model.bin" if name == "hf_folder" else files[name]
    assert_error(results[name], f"{shown}: {REFUSED}", out=folder / f"out_{name}", prefix=True)
    assert results[name].stderr.strip().endswith(ADVICE)
    if name in ("zip_pt", "raw_bin", "pickle_as_base", "nested_pt"):
        assert (
            "(Trying to load unsupported GLOBAL posix.system" in results[name].stderr
        )  # says what it refused
    assert not marker.exists(), "the pickle's payload ran"


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_safetensors(hostile, name):
    folder, marker, files, expected, results = hostile
    assert_error(results[name], f"{files[name]}: {expected[name]}", out=folder / f"out_{name}")


def test_garbage_pt_is_not_called_hostile(tmp_path):
    """A file that is no pickle at all gets "not readable", not the unpickling refusal."""
    base, tuned = toy_models(1)
    b = save_safetensors(tmp_path / "b.safetensors", base)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, this is not a checkpoint")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    res = run_cli_many(
        {
            "junk": ["merge", "--base", b, "--models", junk, "--out", tmp_path / "o1"],
            "empty": ["merge", "--base", b, "--models", empty, "--out", tmp_path / "o2"],
        }
    )
    assert_error(
        res["junk"], f"{junk}: not a readable PyTorch checkpoint: ", out=tmp_path / "o1", prefix=True
    )
    assert_error(
        res["empty"], f"{empty}: not a readable PyTorch checkpoint: ", out=tmp_path / "o2", prefix=True
    )


def test_safe_pt_still_loads(tmp_path):
    """weights_only=True keeps plain state dicts (and nested ones) working."""
    base, tuned = toy_models(2)
    b = save_safetensors(tmp_path / "b.safetensors", base)
    torch.save(tuned[0], tmp_path / "a.pt")
    torch.save({"state_dict": tuned[1], "epoch": 3}, tmp_path / "b.bin")
    res = run_cli(
        "merge",
        "--base",
        b,
        "--models",
        tmp_path / "a.pt",
        tmp_path / "b.bin",
        "--lambda",
        "0.5",
        "--out",
        tmp_path / "o",
    )
    assert res.returncode == 0, res.stderr
    got = load_folder(tmp_path / "o")
    want = task_arithmetic(base, tuned, 0.5)
    for k in want:
        assert torch.equal(got[k], want[k]), k
