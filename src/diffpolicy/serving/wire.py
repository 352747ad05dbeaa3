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


def decode(message: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a message written by `encode`; arrays are read-only views of the message."""
    if len(message) < _HEADER.size:
        raise WireError("message shorter than its header length")
    (n,) = _HEADER.unpack_from(message)
    try:
        header = json.loads(message[_HEADER.size : _HEADER.size + n])
        specs = header["arrays"]
    except (ValueError, KeyError, TypeError) as e:
        raise WireError(f"bad message header: {e}") from None
    arrays, offset = {}, _HEADER.size + n
    for spec in specs:
        dtype = np.dtype(spec["dtype"])
        if dtype.kind not in _ALLOWED_KINDS:
            raise WireError(f"array '{spec['key']}' has a non-numeric dtype {dtype}")
        shape = tuple(int(s) for s in spec["shape"])
        size = dtype.itemsize * math.prod(shape)
        if offset + size > len(message):
            raise WireError(f"array '{spec['key']}' runs past the end of the message")
        arrays[spec["key"]] = np.frombuffer(
            message, dtype=dtype, count=math.prod(shape), offset=offset
        ).reshape(shape)
        offset += size
    if offset != len(message):
        raise WireError(f"{len(message) - offset} trailing bytes after the last array")
    return header.get("meta", {}), arrays
