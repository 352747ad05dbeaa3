"""The wire encoding of the policy server: a JSON header followed by raw numpy buffers, no pickle.

    message = uint32 little-endian header length | header (UTF-8 JSON) | buffer 0 | buffer 1 | ...
    header  = {"meta": {...}, "arrays": [{"key": str, "dtype": str, "shape": [int, ...]}, ...]}

Only numeric dtypes (bool, ints, floats) are accepted, so nothing in a message can execute code when it
is decoded, and any language that reads JSON and raw little-endian arrays can talk to the server.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

_ALLOWED_KINDS = "biuf"  # bool, signed / unsigned integers, floats
_HEADER = struct.Struct("<I")


class WireError(ValueError):
    """A message is not a well-formed header + buffers message."""


def encode(meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """One message from JSON-serializable `meta` and named numeric arrays (sent little-endian, C order)."""
    specs, buffers = [], []
    for key, value in (arrays or {}).items():
        a = np.asarray(value)
        if a.dtype.kind not in _ALLOWED_KINDS:
            raise WireError(f"array '{key}' has dtype {a.dtype}; only bool, integer and float arrays travel")
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        specs.append({"key": key, "dtype": a.dtype.str, "shape": list(a.shape)})
        buffers.append(a.tobytes())
    header = json.dumps({"meta": meta, "arrays": specs}).encode()
    return b"".join([_HEADER.pack(len(header)), header, *buffers])


def _array_spec(spec: Any) -> tuple[str, np.dtype, tuple[int, ...]]:
    """(key, dtype, shape) of one header entry, or WireError naming what is wrong with it."""
    if not isinstance(spec, dict) or not isinstance(spec.get("key"), str):
        raise WireError(f"bad message header: array entry {spec!r} needs a string 'key'")
    key = spec["key"]
    for field in ("dtype", "shape"):
        if field not in spec:
            raise WireError(f"bad message header: array '{key}' has no '{field}'")
    try:
        dtype = np.dtype(spec["dtype"])
    except TypeError:
        raise WireError(f"array '{key}' has an unknown dtype {spec['dtype']!r}") from None
    if dtype.kind not in _ALLOWED_KINDS:
        raise WireError(f"array '{key}' has a non-numeric dtype {dtype}")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise WireError(f"array '{key}' has shape {shape!r}; a shape is a list of non-negative integers")
    return key, dtype, tuple(shape)


def decode(message: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a message written by `encode`; arrays are read-only views of the message.
    Anything malformed (header, entry, sizes) raises WireError saying what."""
    if len(message) < _HEADER.size:
        raise WireError("message shorter than its header length")
    (n,) = _HEADER.unpack_from(message)
    if _HEADER.size + n > len(message):
        raise WireError(f"header length {n} runs past the end of the {len(message)}-byte message")
    try:
        header = json.loads(message[_HEADER.size : _HEADER.size + n])
    except ValueError as e:
        raise WireError(f"bad message header: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise WireError("bad message header: expected an object with an 'arrays' list")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("bad message header: 'meta' must be an object")
    arrays, offset = {}, _HEADER.size + n
    for spec in header["arrays"]:
        key, dtype, shape = _array_spec(spec)
        if key in arrays:
            raise WireError(f"array '{key}' appears twice in the message")
        size = dtype.itemsize * math.prod(shape)
        if offset + size > len(message):
            raise WireError(f"array '{key}' runs past the end of the message")
        arrays[key] = np.frombuffer(message, dtype=dtype, count=math.prod(shape), offset=offset).reshape(
            shape
        )
        offset += size
    if offset != len(message):
        raise WireError(f"{len(message) - offset} trailing bytes after the last array")
    return meta, arrays
