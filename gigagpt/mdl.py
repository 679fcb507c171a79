"""Read cstorch ``.mdl`` (HDF5) checkpoints as data only: no code from the file runs.

``cstorch.load`` turns some stored objects back into Python objects with ``dill.loads`` (any
object cstorch has no serializer for, and the whole structure of its legacy format), and falls
back to ``torch.load(weights_only=False)`` for files that are not HDF5: a crafted file runs code
on load. This reader follows the layout cstorch 2.x writes (format version 0.5) with h5py and
JSON only:

- the file's attributes hold the nesting (a JSON pytree spec) and, per leaf, JSON metadata
  naming the serializer that wrote it;
- tensors and numpy arrays are HDF5 datasets; ``None``, numbers and strings live in the metadata;
- tied tensors are links to another leaf;
- pickled objects (cstorch's fallback serializer) are read with an unpickler that builds only
  plain containers, numbers and strings, and refuses everything else.

Anything else (legacy files, external links to other files, deferred graph tensors, unknown
serializers or container types) is refused with a ``ValueError``, never executed. Needs
``h5py`` and ``hdf5plugin`` (cstorch compresses datasets with LZ4); both come with
cerebras-pytorch. cstorch itself is not imported.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from gigagpt.errors import ConfigError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SPEC, _META, _OBJECTS, _TYPE = "__spec__", "__metadata__", "__objects__", "__TYPE__"
# Containers the pytree spec may name; their children are rebuilt, nothing is imported by name.
_CONTAINERS = {"builtins.dict": dict, "collections.OrderedDict": OrderedDict,
               "builtins.list": list, "builtins.tuple": tuple, "builtins.set": set}
_TORCH_DTYPES = {str(t): t for t in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                     torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                     torch.bool)}


class UnsafeCheckpointError(ConfigError):
    """The file holds something that could only be read by running code from it."""


def is_hdf5(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == HDF5_MAGIC


class _PlainUnpickler(pickle.Unpickler):
    """Builds containers, numbers and strings; any class or function named in the stream is refused."""

    _ALLOWED = {("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set,
                ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex}

    def find_class(self, module: str, name: str):
        allowed = self._ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(f"it names {module}.{name}, which only running code could rebuild")
        return allowed


_LEAF = object()


def _unflatten(schema: dict, scope: list[str], keys: list[str]) -> Any:
    """One pytree node as ``(kind, names, children)``; ``keys`` collects each leaf's dotted name in
    cstorch's order (``cstorch.utils.nest.recurse_spec``)."""
    kind, context, children = schema["type"], schema["context"], schema["children_spec"]
    if kind is None and not children:
        keys.append(".".join(scope))
        return _LEAF
    if kind not in _CONTAINERS:
        raise UnsafeCheckpointError(f"it holds a container of type {kind!r}")
    names = json.loads(context) if kind in ("builtins.dict", "collections.OrderedDict") else None
    labels = [str(k) for k in names] if names else [str(i) for i in range(len(children))]
    return kind, names, [_unflatten(c, [*scope, label], keys) for c, label in zip(children, labels)]


def _build(node: Any, values: list) -> Any:
    if not isinstance(node, tuple):
        return values.pop(0)
    kind, names, children = node
    built = [_build(child, values) for child in children]
    if kind in ("builtins.dict", "collections.OrderedDict"):
        return _CONTAINERS[kind](zip(names, built))
    return _CONTAINERS[kind](built)


def _spec(text: str) -> tuple[Any, list[str]]:
    protocol, schema = json.loads(json.loads(text)[1])
    if protocol != 1:
        raise UnsafeCheckpointError(f"unknown structure format {protocol}")
    keys: list[str] = []
    return _unflatten(schema, [], keys), keys


def _tensor(array: np.ndarray, meta: dict) -> torch.Tensor:
    dtype = _TORCH_DTYPES.get(meta.get("dtypes", [""])[0])
    if dtype is None:
        raise UnsafeCheckpointError(f"tensor dtype {meta.get('dtypes')!r} is not supported")
    shape = tuple(meta["shapes"][0])
    if dtype is torch.bfloat16:  # stored as its 16 raw bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(array).astype(array.dtype, copy=True)).to(dtype).reshape(shape)


def _leaf(f, key: str, meta: dict, values: dict) -> Any:
    """One leaf, dispatched on the serializer cstorch recorded; only data-only serializers are read."""
    kind = meta.get(_TYPE)
    if kind == "NoneSerializer":
        return None
    if kind == "ScalarSerializer":
        return meta["scalar_value"]
    if kind == "StringSerializer":
        return meta["string_value"]
    if kind == "LinkedObject":  # a tensor tied to an earlier leaf
        if meta.get("key") not in values:
            raise UnsafeCheckpointError(f"leaf {key!r} links to a missing leaf")
        return values[meta["key"]]
    if kind in ("TorchTensorSerializer", "NumpyArraySerializer") and meta.get("__NUMPY__"):
        array = f[key][...]
        return _tensor(array, meta) if kind == "TorchTensorSerializer" else np.array(array)
    if kind == "ObjectSerializer" and meta.get("__BYTES__"):
        data = f[key].attrs["__BYTES__"].tobytes()
        return _PlainUnpickler(io.BytesIO(data)).load()
    raise UnsafeCheckpointError(f"leaf {key!r} was written by {kind!r}, which this reader does not run")


def read_mdl(path: str | os.PathLike) -> Any:
    """The object ``cstorch.save`` wrote to ``path``, with CPU tensors; :class:`ValueError` if unsafe
    or unreadable."""
    try:
        import h5py
        import hdf5plugin  # noqa: F401  (registers the LZ4 filter cstorch compresses with)
    except ImportError:
        raise ConfigError(f"{os.fspath(path)} is a Cerebras .mdl (HDF5) checkpoint; reading it needs h5py and "
                         "hdf5plugin: pip install \"gigagpt[cerebras]\" (they come with cerebras-pytorch)") from None
    try:
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            if float(attrs.get("__version__", 0)) < 0.5:
                raise UnsafeCheckpointError("it is in cstorch's legacy format, whose structure is a pickle")
            if not attrs.get("__SUCCESS__", False):
                raise ConfigError(f"checkpoint {os.fspath(path)!r} is incomplete (its write was interrupted); "
                                  "use an earlier checkpoint")
            tree, top_keys = _spec(attrs[_SPEC])
            values: dict[str, Any] = {}
            for top in top_keys:
                meta = json.loads(attrs[f"{top}.{_META}"])
                _, inner = _spec(json.dumps(meta[_SPEC]))
                if inner != [top] or top not in meta[_OBJECTS]:
                    raise UnsafeCheckpointError(f"leaf {top!r} is a nested or external object")
                values[top] = _leaf(f, top, meta[f"{top}.{_META}"], values)
            return _build(tree, [values[k] for k in top_keys])
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(
            f"checkpoint {os.fspath(path)!r} is not loaded: {err}; only tensors and plain data are read "
            "from checkpoints") from None
    except (OSError, KeyError, TypeError, json.JSONDecodeError, pickle.UnpicklingError, EOFError) as err:
        raise ConfigError(f"checkpoint {os.fspath(path)!r} is unreadable ({type(err).__name__}: {err}); it may be "
                         "truncated or not a checkpoint. Use an earlier checkpoint") from None


def mdl_global_step(path: str | os.PathLike) -> int | None:
    """A complete ``.mdl`` Lightning checkpoint's ``global_step`` from its attributes alone (cheap at
    any size); ``None`` for an incomplete or foreign file or without h5py."""
    try:
        import h5py
        import hdf5plugin  # noqa: F401
    except ImportError:
        return None
    try:
        with h5py.File(path, "r") as f:
            if float(f.attrs.get("__version__", 0)) < 0.5 or not f.attrs.get("__SUCCESS__", False):
                return None
            meta = json.loads(f.attrs["global_step.__metadata__"])["global_step.__metadata__"]
            step = meta.get("scalar_value") if meta.get(_TYPE) == "ScalarSerializer" else None
            return step if isinstance(step, int) else None
    except (OSError, KeyError, TypeError, ValueError):
        return None
