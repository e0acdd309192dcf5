"""Turn a pickled PyTorch checkpoint into safetensors without running anything in it.

The paper-line codebases (task_vectors, TSV, ISO, Weight Weaving) save whole modules with
``torch.save(image_encoder)``. Loading such a file the usual way imports the classes it names (the
original ``src`` package, open_clip) and lets the file call whatever it likes; ``weights_only=True``
refuses it. Here a :class:`pickle.Unpickler` resolves every class name to an inert *record* (an object
that only stores the arguments and state pickle hands it) and never imports anything. Only a short
allow-list of real constructors is used: our own tensor and storage rebuilders (tensor bytes come from
the zip's ``data/<key>`` records through ``persistent_load``), ``OrderedDict``, ``set`` and a few more
harmless builtins. A *call* of anything else that is not shaped like a class (``os.system``,
``builtins.eval``, ``subprocess.*``) is refused with its name. The tensors are then collected from the
record tree the way ``nn.Module.state_dict()`` names them: each module's ``_parameters`` and
persistent ``_buffers``, its ``_modules`` children joined with ``.``.

Formats: torch's zip format (``data.pkl`` + ``data/<key>``), the legacy pre-1.6 stream
(``_use_new_zipfile_serialization=False``), and plain pickles of tensors. Besides whole modules, state
dicts and ``{"state_dict": ...}``-style wrappers are accepted.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import logging
import os
import pickle
import shutil
import struct
import sys
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from ..errors import CheckpointError, WeightWeavingError
from ..files import check_regular
from .safetensors_file import DTYPE_NAMES
from .torch_file import NESTED_KEYS
from .writer import STAGING_MARK, OutputEntry, SafetensorsWriter, clean_stale_staging

log = logging.getLogger("weightweaving")

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's pre-1.6 stream format
MAX_DEPTH = 200  # module nesting deeper than this is refused (a hostile file could loop)

# Modules (with their submodules) a model checkpoint never calls into: a call of any name in them is
# refused, even one shaped like a class.
SYSTEM_MODULES = frozenset(
    {
        "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "shutil", "importlib",
        "runpy", "pty", "socket", "ctypes", "code", "codeop", "pickle", "_pickle", "marshal",
        "webbrowser", "multiprocessing", "signal", "threading", "asyncio", "io", "_io",
        "builtins", "__builtin__", "operator", "tempfile", "glob", "urllib", "http",
        "ftplib", "smtplib", "commands", "platform", "site", "sysconfig", "zipimport", "pdb",
        "inspect", "gc", "resource", "fcntl", "select", "mmap", "dill", "cloudpickle", "joblib",
        "torch._ops", "torch.ops", "torch.hub", "torch.storage", "torch.serialization", "torch.jit",
        "torch.package", "torch.utils.cpp_extension",
    }
)  # fmt: skip
# Classes with lower-case names (a call only builds an instance; kept as a record).
LOWERCASE_CLASSES = frozenset(
    {
        "functools.partial",
        "collections.defaultdict",
        "collections.deque",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
    }
)
STORAGE_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for dtype, name in torch.storage._dtype_to_storage_type_map().items()
    if not name.startswith(("QInt", "QUInt"))  # quantised storages are refused
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in {*DTYPE_NAMES, *torch.storage._dtype_to_storage_type_map()}
}


class Refused(Exception):
    """The file asks for a global that is not rebuilt as a record or an allowed constructor."""

    def __init__(self, qualified: str, why: str) -> None:
        super().__init__(f"refuses to rebuild '{qualified}': {why} (nothing in the file was run)")


# -- records: inert stand-ins for classes that are never imported -----------------------------------
class _Record:
    """An instance of a class the file names but we never import: it keeps what pickle gives it.

    ``NEWOBJ`` builds it with ``__new__`` (the arguments go to ``args``), ``BUILD`` hands it its state
    through ``__setstate__``, and ``APPENDS``/``SETITEMS`` for list or dict subclasses land in
    ``items``. Nothing of the original class runs.
    """

    qualified_name = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> _Record:
        record = object.__new__(cls)
        record.args, record.kwargs, record.state, record.items = args, kwargs, None, []
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # a call with arguments: absorbed by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __reduce__(self) -> Any:
        raise TypeError("records are not meant to be pickled again")

    def __repr__(self) -> str:
        return f"<record of {self.qualified_name}>"

    @property
    def attributes(self) -> dict[str, Any]:
        """The instance dictionary the object had: its ``__getstate__`` dict (or the dict part of a
        ``(dict, slots)`` pair), merged with the slots."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, Mapping):
                    merged.update(part)
            return merged
        return dict(state) if isinstance(state, Mapping) else {}


class _CallRefused(_Record):
    """A name that is not shaped like a class: referencing it is harmless, calling it is refused."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise Refused(
            self.qualified_name,
            "the file calls it, and only tensor constructors and classes of model code are rebuilt",
        )


@functools.lru_cache(maxsize=4096)
def _record_class(qualified: str, refuse_calls: bool) -> type[_Record]:
    base = _CallRefused if refuse_calls else _Record
    return type(qualified.rsplit(".", 1)[-1], (base,), {"qualified_name": qualified, "__module__": __name__})


def _looks_like_a_class(module: str, name: str) -> bool:
    """Calls of these are absorbed as records: CapWords names outside the system modules."""
    qualified = f"{module}.{name}"
    if qualified in LOWERCASE_CLASSES:
        return True
    parts = module.split(".")
    if any(".".join(parts[:i]) in SYSTEM_MODULES for i in range(1, len(parts) + 1)):
        return False
    return name.rsplit(".", 1)[-1][:1].isupper()


# -- tensors and storages ---------------------------------------------------------------------------
class _Storage:
    """The bytes of one pickled storage (``data`` is None during the legacy format's first pass)."""

    def __init__(self, dtype: torch.dtype, data: Tensor | None) -> None:
        self.dtype = dtype
        self.data = data  # (nbytes,) uint8


class _NotAPickle(Exception):
    """The file starts like neither a zip archive nor a pickle of protocol 2 or later."""


class _StorageType:
    """What ``torch.FloatStorage`` and friends stand for in a pickle: only their dtype matters."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Pending:
    """A tensor whose bytes are not read yet (legacy format, first pass)."""


def _byte_tensor(raw: bytearray) -> Tensor:
    """The bytes as a (n,) uint8 tensor sharing their memory (frombuffer refuses an empty buffer)."""
    return torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise pickle.UnpicklingError(f"a tensor's {what} is not a tuple of integers")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Tensor | _Pending:
    """``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` on our storage: a strided view."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor refers to something that is not a storage")
    if type(offset) is not int or offset < 0:
        raise pickle.UnpicklingError("a tensor's storage offset is not a non-negative integer")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    metadata = rest[2] if len(rest) >= 3 else None
    if metadata:  # conjugate / negative bits change the values; never seen in model checkpoints
        raise pickle.UnpicklingError(f"tensor metadata {sorted(metadata)} is not supported")
    if storage.data is None:
        return _Pending()
    itemsize = torch.empty((), dtype=storage.dtype).element_size()
    usable = storage.data.numel() - storage.data.numel() % itemsize
    flat = storage.data[:usable].view(storage.dtype)  # (numel,)
    try:
        tensor = flat.as_strided(shape, strides, offset)
    except RuntimeError as exc:  # sizes/strides out of the storage's bounds
        raise pickle.UnpicklingError(
            f"a tensor does not fit its storage: {str(exc).splitlines()[0]}"
        ) from None
    if tensor.numel() > flat.numel():  # overlapping strides: writing it out would multiply the bytes
        raise pickle.UnpicklingError(
            f"a tensor of {tensor.numel()} elements views a storage of {flat.numel()} (overlapping strides)"
        )
    return tensor


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    """``torch._utils._rebuild_parameter(_with_state)``: the tensor itself (gradients are irrelevant)."""
    return data


def _rebuild_from_type(function: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2``: a tensor subclass; keep the plain tensor."""
    if function not in (_rebuild_tensor, _rebuild_parameter, _rebuild_from_type):
        raise pickle.UnpicklingError("a tensor subclass is rebuilt by an unexpected function")
    return function(*args)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: how protocol 2 stores ``bytes`` (``encode(str, 'latin1')``)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise Refused("_codecs.encode", "only text to bytes is rebuilt")
    return text.encode(encoding)


def _getattr(owner: Any, name: Any, *default: Any) -> Any:
    """``getattr(EnumClass, 'MEMBER')`` (how Python 3.12 pickles enum members): a record, no lookup."""
    if not (isinstance(owner, type) and issubclass(owner, _Record)) or not isinstance(name, str):
        raise Refused("builtins.getattr", "only a member of a recorded class is rebuilt")
    return owner(name)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocols 0 and 1): a record of ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, _Record)):
        raise Refused("copyreg._reconstructor", "only classes named in the file are rebuilt")
    return cls.__new__(cls, state)


def _device(*args: Any) -> Any:
    if not all(isinstance(a, (str, int)) for a in args):
        raise Refused("torch.device", "only a device name is rebuilt")
    return torch.device(*args)


# -- the unpickler ---------------------------------------------------------------------------------
class RecordUnpickler(pickle.Unpickler):
    """An unpickler that imports nothing: allowed constructors, otherwise records."""

    def __init__(self, file: BinaryIO, storages: Callable[[tuple[Any, ...]], Any]) -> None:
        super().__init__(file)
        self._storages = storages
        self.classes: list[str] = []  # every class name the file used, in order of first use
        self._allowed: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
            ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
            ("torch", "device"): _device,
            ("torch", "Size"): torch.Size,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("builtins", "object"): object,
            ("builtins", "dict"): dict,
            ("builtins", "list"): list,
            ("builtins", "tuple"): tuple,
            ("builtins", "getattr"): _getattr,
            ("_codecs", "encode"): _encode,
            ("copyreg", "_reconstructor"): _reconstructor,
        }

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2 writes '__builtin__'), mapped as pickle's own find_class does;
        # the mapped names exist only in Python 2, so mapping them always is harmless.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module == "torch.tensor":
            module = "torch._tensor"
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name == "UntypedStorage":
            return _StorageType(torch.uint8)
        if module == "torch" and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        qualified = f"{module}.{name}"
        if qualified not in self.classes:
            self.classes.append(qualified)
        return _record_class(qualified, refuse_calls=not _looks_like_a_class(module, name))

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError("a persistent id that is not a tuple")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) >= 2:  # legacy format: a class with its source (ignored)
            return pid[1]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id kind {kind!r}")
        return self._storages(pid[1:])


def _storage_dtype(storage_type: Any) -> torch.dtype:
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    return storage_type.dtype


def _nbytes(numel: Any, dtype: torch.dtype) -> int:
    if type(numel) is not int or numel < 0:
        raise pickle.UnpicklingError("a storage size is not a non-negative integer")
    return numel * torch.empty((), dtype=dtype).element_size()


def _load_zip(archive: zipfile.ZipFile) -> tuple[Any, list[str]]:
    """Torch's zip format: ``<prefix>/data.pkl`` with storages in ``<prefix>/data/<key>``."""
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
        raise pickle.UnpicklingError("a zip file without exactly one data.pkl: not a PyTorch checkpoint")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    if prefix + "byteorder" in names and archive.read(prefix + "byteorder").decode() != sys.byteorder:
        raise pickle.UnpicklingError("the file was saved on a machine of the other byte order")
    loaded: dict[str, _Storage] = {}

    def storage(data: tuple[Any, ...]) -> _Storage:
        if len(data) != 4:
            raise pickle.UnpicklingError("a storage record of an unknown layout")
        storage_type, key, _location, numel = data
        dtype = _storage_dtype(storage_type)
        if not isinstance(key, str) or f"{prefix}data/{key}" not in names:
            raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive")
        if key not in loaded:
            info = archive.getinfo(f"{prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; a bomb might
                raise pickle.UnpicklingError(f"storage {key!r} is compressed, which torch never does")
            nbytes = _nbytes(numel, dtype)
            if info.file_size < nbytes:
                raise pickle.UnpicklingError(f"storage {key!r} is shorter than its tensors need")
            with archive.open(info) as member:  # read what the tensors need, whatever the record claims
                raw = bytearray(member.read(nbytes))
            loaded[key] = _Storage(dtype, _byte_tensor(raw))
        return loaded[key]

    unpickler = RecordUnpickler(io.BytesIO(archive.read(pickles[0])), storage)
    return unpickler.load(), unpickler.classes


def _load_legacy(stream: BinaryIO) -> tuple[Any, list[str]]:
    """Torch's pre-1.6 stream: magic, version, sys info, the object, storage keys, then raw storages.

    The tensors come before their bytes, so the object is unpickled twice: once to learn each
    storage's dtype, once more with the bytes in place.
    """
    RecordUnpickler(stream, _no_storages).load()  # protocol version
    sys_info = RecordUnpickler(stream, _no_storages).load()
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise pickle.UnpicklingError("the file was saved on a big-endian machine")
    start = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    dtypes: dict[str, torch.dtype] = {}

    def first_pass(data: tuple[Any, ...]) -> _Storage:
        if len(data) != 5:
            raise pickle.UnpicklingError("a storage record of an unknown layout")
        storage_type, key, _location, numel, view = data
        if view is not None:
            raise pickle.UnpicklingError("storage views of the legacy format are not supported")
        dtypes[str(key)] = _storage_dtype(storage_type)
        _nbytes(numel, dtypes[str(key)])
        return _Storage(dtypes[str(key)], None)

    RecordUnpickler(stream, first_pass).load()
    keys = RecordUnpickler(stream, _no_storages).load()
    if not isinstance(keys, list) or {str(k) for k in keys} != set(dtypes):
        raise pickle.UnpicklingError("the list of storages does not match the object")
    loaded: dict[str, _Storage] = {}
    for key in keys:
        dtype = dtypes[str(key)]
        head = stream.read(8)
        if len(head) != 8:
            raise pickle.UnpicklingError("the file ends inside its storages: truncated")
        nbytes = _nbytes(struct.unpack("<q", head)[0], dtype)
        if nbytes > end - stream.tell():
            raise pickle.UnpicklingError("the file ends inside its storages: truncated")
        raw = bytearray(stream.read(nbytes))
        if len(raw) != nbytes:
            raise pickle.UnpicklingError("the file ends inside its storages: truncated")
        loaded[str(key)] = _Storage(dtype, _byte_tensor(raw))
    stream.seek(start)
    unpickler = RecordUnpickler(stream, lambda data: loaded[str(data[1])])
    return unpickler.load(), unpickler.classes


def _no_storages(data: tuple[Any, ...]) -> Any:
    raise pickle.UnpicklingError("a storage where none is expected")


def _load_stream(stream: BinaryIO) -> tuple[Any, list[str]]:
    """Any supported container: zip, legacy stream, or a plain pickle."""
    head = stream.read(4)
    stream.seek(0)
    if head == b"PK\x03\x04":
        try:
            archive = zipfile.ZipFile(stream)
        except (zipfile.BadZipFile, OSError) as exc:
            raise pickle.UnpicklingError(f"a zip file that is truncated or corrupt ({exc})") from None
        with archive:
            return _load_zip(archive)
    if head[:1] != b"\x80":  # torch.save and pickle.dumps write protocol 2 or later
        raise _NotAPickle
    first = RecordUnpickler(stream, _no_storages)
    obj = first.load()
    if type(obj) is int and obj == LEGACY_MAGIC:
        return _load_legacy(stream)
    return obj, first.classes


def _load_storage_from_bytes(data: Any) -> _Storage:
    """``torch.storage._load_from_bytes``: a storage pickled on its own (plain ``pickle.dumps`` of
    tensors) is a small torch file in bytes; read it with this same loader, never ``torch.load``."""
    if not isinstance(data, bytes):
        raise Refused("torch.storage._load_from_bytes", "only bytes are rebuilt")
    obj, _ = _load_stream(io.BytesIO(data))
    if not isinstance(obj, _Storage):
        raise pickle.UnpicklingError("a pickled storage holds something else")
    return obj


# -- from the record tree to a state dict -----------------------------------------------------------
def _is_module(obj: Any) -> bool:
    return isinstance(obj, _Record) and {"_parameters", "_buffers", "_modules"} <= obj.attributes.keys()


def _module_state_dict(root: _Record) -> dict[str, Tensor]:
    """The names ``nn.Module.state_dict()`` gives: per module its parameters, its persistent buffers,
    then its children, joined with ``.``."""
    out: dict[str, Tensor] = {}

    def walk(record: _Record, prefix: str, ancestors: tuple[int, ...]) -> None:
        if id(record) in ancestors or len(ancestors) > MAX_DEPTH:
            raise CheckpointError(f"the module tree loops or nests too deep at '{prefix or '(root)'}'")
        attributes = record.attributes
        skip = attributes.get("_non_persistent_buffers_set") or ()
        skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
        for group in ("_parameters", "_buffers"):
            entries = attributes[group]
            if not isinstance(entries, Mapping):
                raise CheckpointError(f"module '{prefix or '(root)'}' has a {group} that is not a dict")
            for name, value in entries.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, Tensor):
                    raise CheckpointError(f"'{prefix}{name}' is not a tensor but a {_kind(value)}")
                out[f"{prefix}{name}"] = value
        children = attributes["_modules"]
        if not isinstance(children, Mapping):
            raise CheckpointError(f"module '{prefix or '(root)'}' has _modules that is not a dict")
        for name, child in children.items():
            if child is None:
                continue
            if not _is_module(child):
                raise CheckpointError(f"submodule '{prefix}{name}' is not a module but a {_kind(child)}")
            walk(child, f"{prefix}{name}.", (*ancestors, id(record)))

    walk(root, "", ())
    return out


def _kind(value: Any) -> str:
    return value.qualified_name if isinstance(value, _Record) else type(value).__name__


def collect_tensors(obj: Any) -> tuple[dict[str, Tensor], str]:
    """The state dict held by an unpickled object, and what it was (for the summary line).

    Accepts a module record, a state dict, or a dict wrapping either under a usual key
    (``state_dict``, ``model``, ...; three levels at most).
    """
    trail: list[str] = []
    for _ in range(4):
        if _is_module(obj):
            found = _module_state_dict(obj)
            what = f"a pickled module '{obj.qualified_name}'"
            return found, " ".join([what, *trail])
        if isinstance(obj, Mapping):
            if obj and all(isinstance(v, Tensor) for v in obj.values()):
                return {str(k): v for k, v in obj.items()}, " ".join(["a state dict", *trail])
            inner = [
                k for k in NESTED_KEYS if k in obj and (isinstance(obj[k], Mapping) or _is_module(obj[k]))
            ]
            if inner:
                trail.insert(0, f"under '{inner[0]}'")
                obj = obj[inner[0]]
                continue
        break
    raise CheckpointError(f"holds no module or state dict of tensors (found a {_kind(obj)})")


def read_pickled(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], str]:
    """Read a pickled checkpoint without importing or running anything from it.

    Args:
        path: a ``torch.save`` file (zip or legacy format) or a plain pickle of tensors.

    Returns:
        ``(state_dict, description)``: tensors by ``state_dict()`` name (views may share memory),
        and a few words on what the file held.

    Raises:
        CheckpointError: the file is unreadable, holds no tensors, or asks to call something that is
        neither a class nor an allowed constructor (named in the message).
    """
    path = Path(path)
    check_regular(path)  # never a device, FIFO, socket or /proc file
    try:
        with open(path, "rb") as stream:
            obj, classes = _load_stream(stream)
    except Refused as exc:
        raise CheckpointError(str(exc), path=path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read: {exc.strerror or exc}", path=path) from None
    except (pickle.UnpicklingError, EOFError) as exc:
        raise CheckpointError(f"not a readable pickled checkpoint: {_first_line(exc)}", path=path) from None
    except _NotAPickle:
        raise CheckpointError(
            "neither a PyTorch checkpoint nor a pickle (it does not start like either)", path=path
        ) from None
    except RecursionError:
        raise CheckpointError("not a readable pickled checkpoint: nested too deep", path=path) from None
    except Exception as exc:  # a malformed pickle can fail in many ways (bad opcode, wrong arguments)
        raise CheckpointError(
            f"not a readable pickled checkpoint: {type(exc).__name__}: {_first_line(exc)}", path=path
        ) from None
    log.info("%s: rebuilt as records, never imported: %s", path, ", ".join(classes) or "nothing")
    try:
        return collect_tensors(obj)
    except CheckpointError as exc:
        raise CheckpointError(str(exc), path=path) from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


# -- writing -----------------------------------------------------------------------------------------
def convert_checkpoint(
    source: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False
) -> tuple[Path, int, str]:
    """Convert a pickled checkpoint to safetensors, atomically.

    Args:
        source: the pickled file (see :func:`read_pickled`).
        out: a file path with a suffix (``merged.safetensors``), or a folder (no suffix) that will hold
            ``model.safetensors``.
        overwrite: replace ``out`` if it exists.

    Returns:
        ``(written path, number of tensors, description of the source)``.

    Example:
        >>> import torch, tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> torch.save(torch.nn.Linear(2, 1), folder / "whole.pt")
        >>> convert_checkpoint(folder / "whole.pt", folder / "out.safetensors")[1:]
        (2, "a pickled module 'torch.nn.modules.linear.Linear'")
        >>> import shutil; shutil.rmtree(folder)
    """
    source, target = Path(source), Path(out)
    as_file = bool(target.suffix)
    if target.exists() and not overwrite:
        raise WeightWeavingError("the output exists; pass --overwrite to replace it", path=target)
    if target.exists() and as_file and target.is_dir():
        raise WeightWeavingError(
            "the output is a folder; give a file name or a path without a suffix", path=target
        )
    tensors, description = read_pickled(source)
    if not tensors:
        raise CheckpointError("holds no tensors", path=source)
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise CheckpointError(
                f"dtype {tensor.dtype} has no safetensors equivalent", path=source, parameter=name
            )
    entries = [OutputEntry(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    metadata = {"converted_from": source.name}
    if not as_file:
        with SafetensorsWriter(target, entries, overwrite=overwrite, metadata=metadata) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)  # copies each tensor's bytes: shared storage is no issue
            written = writer.commit()
        return written / "model.safetensors", len(tensors), description
    # A file: write a hidden folder next to it, then move its one file into place.
    scratch = target.parent / f".{target.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}-out"
    clean_stale_staging(target)
    try:
        with SafetensorsWriter(scratch, entries, metadata=metadata) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
            writer.commit()
        os.replace(scratch / "model.safetensors", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target, len(tensors), description
