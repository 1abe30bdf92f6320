"""Bytes on the wire between processes: messages and the runtime's requests, without pickle.

A deployment moves :class:`~securefl.core.message.Message` objects between
nodes that do not trust each other, so decoding must never execute anything:
no pickle, no ``torch.load``. The format is a small JSON header describing the
structure, followed by the raw buffers it points into::

    b"SFLW1" | u32 header length | header (UTF-8 JSON) | buffers

Values may be None, bool, int, float, str, bytes, torch tensors (numeric
dtypes), lists and string-keyed dicts of these. Anything malformed raises
:class:`DecodeError` naming what is wrong, never another exception.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pydantic
import torch

from securefl.core.message import Message

MAGIC = b"SFLW1"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
MAX_DEPTH = 32


class DecodeError(ValueError):
    """Bytes that are not a well-formed securefl wire value."""


def encode(value: Any) -> bytes:
    buffers: list[bytes] = []
    header = json.dumps(_describe(value, buffers, 0), separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + b"".join(buffers)


def decode(data: bytes) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise DecodeError("not a securefl wire value (bad magic or too short)")
    (n,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if start + n > len(data):
        raise DecodeError(f"truncated: header of {n} bytes, {len(data) - start} available")
    try:
        header = json.loads(data[start:start + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"header is not JSON ({exc})") from None
    except RecursionError:
        raise DecodeError(f"header nested deeper than {MAX_DEPTH} levels") from None
    body = memoryview(data)[start + n:]
    reader = _Reader(body)
    value = _build(header, reader, 0)
    if reader.offset != len(body):
        raise DecodeError(f"{len(body) - reader.offset} trailing bytes after the value")
    return value


def encode_message(msg: Message) -> bytes:
    return encode(msg.model_dump())


def decode_message(data: bytes) -> Message:
    """A :class:`Message` from bytes, or :class:`DecodeError` (also for a well-formed but invalid one)."""
    fields = decode(data)
    if not isinstance(fields, dict):
        raise DecodeError(f"a message is a mapping, got {type(fields).__name__}")
    try:
        return Message.model_validate(fields)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        raise DecodeError(f"invalid message: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


# ----- encoding --------------------------------------------------------------------------------
def _describe(value: Any, buffers: list[bytes], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | str):
        return {"t": "v", "v": value}
    if isinstance(value, int):
        return {"t": "i", "v": str(value)}  # JSON numbers would lose big integers
    if isinstance(value, float):
        return {"t": "f", "v": repr(value)}  # keeps nan and inf, which JSON cannot
    if isinstance(value, bytes | bytearray):
        buffers.append(bytes(value))
        return {"t": "b", "n": len(value)}
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        name = str(tensor.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"tensor dtype {tensor.dtype} cannot go on the wire")
        raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        buffers.append(raw)
        return {"t": "T", "d": name, "s": list(tensor.shape), "n": len(raw)}
    if isinstance(value, list | tuple):
        return {"t": "l", "v": [_describe(v, buffers, depth + 1) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("only string-keyed mappings can go on the wire")
        return {"t": "d", "v": {k: _describe(v, buffers, depth + 1) for k, v in value.items()}}
    raise ValueError(f"{type(value).__name__} cannot go on the wire")


# ----- decoding --------------------------------------------------------------------------------
class _Reader:
    def __init__(self, body: memoryview) -> None:
        self.body = body
        self.offset = 0

    def take(self, n: Any) -> bytes:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DecodeError(f"bad buffer length {n!r}")
        if self.offset + n > len(self.body):
            raise DecodeError(f"truncated: a buffer of {n} bytes runs past the end")
        out = bytes(self.body[self.offset:self.offset + n])
        self.offset += n
        return out


def _build(node: Any, reader: _Reader, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise DecodeError(f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict) or not isinstance(node.get("t"), str):
        raise DecodeError(f"malformed header node {str(node)[:60]!r}")
    kind = node["t"]
    try:
        if kind == "v":
            value = node["v"]
            if value is not None and not isinstance(value, bool | str):
                raise DecodeError(f"bad plain value {value!r:.60}")
            return value
        if kind == "i":
            return int(_text(node["v"]))
        if kind == "f":
            return float(_text(node["v"]))
        if kind == "b":
            return reader.take(node["n"])
        if kind == "T":
            return _tensor(node, reader)
        if kind == "l":
            if not isinstance(node["v"], list):
                raise DecodeError("a list node must hold a list")
            return [_build(v, reader, depth + 1) for v in node["v"]]
        if kind == "d":
            if not isinstance(node["v"], dict):
                raise DecodeError("a dict node must hold a mapping")
            return {k: _build(v, reader, depth + 1) for k, v in node["v"].items()}
    except KeyError as exc:
        raise DecodeError(f"header node {kind!r} lacks {exc}") from None
    except (ValueError, OverflowError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"bad {kind!r} value ({exc})") from None
    raise DecodeError(f"unknown header node type {kind!r:.20}")


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 4096:
        raise DecodeError(f"expected a number as text, got {value!r:.60}")
    return value


def _tensor(node: dict[str, Any], reader: _Reader) -> torch.Tensor:
    dtype = _DTYPES.get(node["d"]) if isinstance(node["d"], str) else None
    if dtype is None:
        raise DecodeError(f"unknown tensor dtype {node['d']!r:.40}")
    shape = node["s"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape) or len(shape) > 16:
        raise DecodeError(f"bad tensor shape {shape!r:.60}")
    raw = reader.take(node["n"])
    numel = math.prod(shape)  # exact: numpy's int64 product wraps round for huge shapes
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise DecodeError(f"tensor of shape {shape} and dtype {node['d']} needs {numel * itemsize} bytes, "
                          f"got {len(raw)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()
