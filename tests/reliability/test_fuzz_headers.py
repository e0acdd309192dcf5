"""Fuzzed safetensors files: mutated header lengths, JSON, offsets, dtypes, shapes, truncations, trailing bytes.

Every mutant either loads (and every tensor read is no bigger than the file) or is refused with a
``CheckpointError`` that names the file: never another exception, never a large allocation. CI runs a
few thousand cases in-process; ``python scripts/fuzz_headers.py --cases 100000`` runs many more (it sets
``WEIGHTWEAVING_FUZZ_CASES``, and a fresh random seed unless ``--seed`` is given).
"""

from __future__ import annotations

import json
import os
import resource
import struct
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from weightweaving.checkpoints import open_checkpoint
from weightweaving.checkpoints.safetensors_file import DTYPES
from weightweaving.errors import CheckpointError

CASES = int(os.environ.get("WEIGHTWEAVING_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("WEIGHTWEAVING_FUZZ_SEED", "23"))


def _valid() -> tuple[dict[str, Any], bytes]:
    """A small valid file's header and data: several dtypes, a scalar, an empty tensor, metadata."""
    tensors = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "h": torch.ones(4, dtype=torch.float16),
        "b": torch.ones(1, 2, dtype=torch.bfloat16),
        "i": torch.arange(2, dtype=torch.int64),
        "m": torch.tensor([True, False, True]),
        "s": torch.tensor(3.5, dtype=torch.float64),
        "e": torch.zeros(0, 5, dtype=torch.float32),
    }
    names = {v: k for k, v in DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return header, data


VALID_HEADER, VALID_DATA = _valid()
NAMES = [k for k in VALID_HEADER if k != "__metadata__"]
ints = st.one_of(
    st.integers(-3, 80),
    st.sampled_from([2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]),
)
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    ints,
    st.builds(list),
    st.builds(dict),
)
field_values = {
    "dtype": st.one_of(st.sampled_from([*DTYPES, "F13", "f32", "", "C64", "U16", "F8_E8M0"]), junk),
    "shape": st.one_of(
        st.lists(ints, max_size=6),
        st.lists(ints, max_size=3).map(lambda s: [0, *s]),  # no bytes, whatever the other sizes say
        st.lists(st.just(1), min_size=60, max_size=80),
        junk,
    ),
    "data_offsets": st.one_of(st.lists(ints, min_size=0, max_size=3), junk),
}


@st.composite
def structural(draw: st.DrawFn) -> dict[str, Any]:
    """Edits of the header as JSON data."""
    header = json.loads(json.dumps(VALID_HEADER))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        name = draw(st.sampled_from(NAMES))
        kind = draw(st.sampled_from(["set", "set", "drop", "extra", "rename", "metadata", "entry"]))
        if kind in ("set", "drop", "extra", "rename") and not isinstance(header.get(name), dict):
            continue  # renamed or replaced by an earlier edit
        if kind == "set":
            key = draw(st.sampled_from(list(field_values)))
            header[name][key] = draw(field_values[key])
        elif kind == "drop":
            header[name].pop(draw(st.sampled_from(list(field_values))), None)
        elif kind == "extra":
            header[name][draw(st.text(max_size=4))] = draw(junk)
        elif kind == "rename":
            header[draw(st.text(max_size=8))] = header.pop(name)
        elif kind == "metadata":
            header["__metadata__"] = draw(
                st.one_of(junk, st.dictionaries(st.text(max_size=3), junk, max_size=3))
            )
        else:
            header[name] = draw(junk)
    return header


@st.composite
def mutant(draw: st.DrawFn) -> bytes:
    """A whole file: a header (edited or not), then byte-level damage."""
    header = draw(structural())
    text = json.dumps(header).encode()
    if draw(st.sampled_from([False, False, False, True])):  # duplicate a key at the JSON level
        text = text.replace(
            b'"w": {', b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {', 1
        )
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # flip, insert or delete bytes of the JSON
        if not text:
            break
        at = draw(st.integers(0, len(text) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            text = text[:at] + bytes([draw(st.integers(0, 255))]) + text[at + 1 :]
        elif op == "insert":
            text = text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
        else:
            text = text[:at] + text[at + 1 :]
    length = len(text)
    length_edit = draw(st.sampled_from(["keep", "keep", "delta", "any"]))
    if length_edit == "delta":
        length = max(0, length + draw(st.integers(-9, 9)))
    elif length_edit == "any":
        length = draw(st.integers(0, 2**64 - 1))
    raw = struct.pack("<Q", length) + text + VALID_DATA
    end = draw(st.sampled_from(["keep", "keep", "truncate", "trail"]))
    if end == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif end == "trail":
        raw += draw(st.binary(min_size=1, max_size=64))
    return raw


def check_one(path: Path, raw: bytes) -> bool:
    """Load ``raw`` from ``path``: it loads within the file's size (True), or is refused naming the file."""
    path.write_bytes(raw)
    try:
        ckpt = open_checkpoint(path)
        try:
            for name in ckpt.keys():
                t = ckpt.get(name)
                assert t.numel() * t.element_size() <= len(raw), name
        finally:
            ckpt.close()
    except CheckpointError as exc:
        assert str(exc).startswith(f"{path}: "), str(exc)
        assert "\n" not in str(exc)
        return False
    return True


def test_valid_file_loads(tmp_path):
    raw = struct.pack("<Q", len(json.dumps(VALID_HEADER))) + json.dumps(VALID_HEADER).encode() + VALID_DATA
    check_one(tmp_path / "m.safetensors", raw)
    assert open_checkpoint(tmp_path / "m.safetensors").keys() == NAMES


def test_fuzzed_headers_are_loaded_or_refused_by_name(tmp_path):
    path = tmp_path / "fuzzed.safetensors"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @seed(SEED)
    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutant())
    def fuzz(raw: bytes) -> None:
        outcomes.append(check_one(path, raw))

    outcomes: list[bool] = []
    fuzz()
    loaded = sum(outcomes)
    assert 0.02 < loaded / len(outcomes) < 0.98, f"{loaded} of {len(outcomes)} mutants loaded: the mix is off"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 256, f"peak memory grew by {grown_mib:.0f} MiB while fuzzing"


def test_a_dimension_beyond_int64_is_refused_even_with_no_bytes(tmp_path):
    """Found by fuzzing: shape [0, 2**64] spans 0 bytes, so only the dimension's size can refuse it."""
    header = {"e": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "huge_dim.safetensors"
    assert not check_one(path, struct.pack("<Q", len(raw)) + raw)
    try:
        open_checkpoint(path)
    except CheckpointError as exc:
        assert str(exc) == f"{path}: parameter 'e' invalid shape [0, 18446744073709551616]"
