"""Sealed (encrypted or masked) tensors as they travel inside a :class:`Message`.

A :class:`SealedTensor` is what a secure aggregator returns instead of a
plaintext tensor (CKKS), and what a participant's outbound layer puts in place
of a plaintext field (CKKS or pairwise masking). It is a small frozen value:
wire chunks plus the public facts needed to read them (length, shape, dtype,
scheme).

On a message, a sealed field ``name`` is stored as

* ``payload[name]``: ``list[bytes]``, the wire chunks, and
* ``meta["sealed." + name]``: ``{"scheme", "length", "shape", "dtype", ...}``,

so several sealed fields can share one message, and the signature
(:mod:`securefl.crypto.signing`) covers both.

This module imports neither TenSEAL nor ``cryptography``: protocols may use it
(``architecture.md`` forbids them to import those libraries), e.g.::

    agg = aggregator.mean(replies, "logits")        # Tensor, or SealedTensor under CKKS
    down = attach(Message(...), "consensus", agg)   # works for both
    # ... on the participant, either per field:
    consensus = open_field(msg, "consensus", key_ctx)
    # ... or as an inbound layer, so the protocol keeps calling msg.tensor(...):
    msg = open_sealed_fields(msg, key_ctx)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from securefl.core.message import Message

__all__ = [
    "META_PREFIX",
    "Opener",
    "SealedTensor",
    "Sealer",
    "attach",
    "is_sealed",
    "open_field",
    "open_sealed_fields",
    "seal_field",
]

META_PREFIX = "sealed."

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    """Return the wire name of a torch dtype (``torch.float32`` -> ``"float32"``)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise TypeError(f"dtype {dtype} cannot be sealed; supported: {sorted(_DTYPES)}")


def torch_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown sealed dtype {name!r}; supported: {sorted(_DTYPES)}") from None


_NUMPY: dict[torch.dtype, type[np.generic]] = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
}


def to_float64(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """Return a float64 numpy copy/view of ``values`` (any shape).

    The conversion is done by numpy, not torch: torch's multi-threaded
    ``.to(float64)`` is slow and erratic when its threads compete with
    TenSEAL's or other processes' on a small machine.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu()
        if t.dtype not in _NUMPY:  # e.g. bfloat16, which numpy lacks
            t = t.float()
        return t.numpy().astype(np.float64, copy=False)
    return np.asarray(values, dtype=np.float64)


def from_float64(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Turn decoded float64 values into a tensor of ``dtype``, rounding (not truncating) for integers."""
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    if not dtype.is_floating_point:
        values = np.rint(values)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np_dtype))


@dataclass(frozen=True)
class SealedTensor:
    """An encrypted or masked tensor in wire form.

    Parameters
    ----------
    chunks
        The wire chunks (``bytes``), e.g. one serialized CKKS vector per chunk.
    length
        Number of scalar elements (``prod(shape)``).
    shape
        Shape of the plaintext tensor.
    scheme
        ``"ckks"`` or ``"secagg"``.
    dtype
        Wire name of the plaintext dtype that :meth:`open` restores.
    params
        Public, scheme-specific facts (e.g. the fixed-point parameters of a
        masked vector, or its public pre-weight). JSON-like values only.
    """

    chunks: tuple[bytes, ...]
    length: int
    shape: tuple[int, ...]
    scheme: str = "ckks"
    dtype: str = "float32"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", tuple(self.chunks))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "params", dict(self.params))
        if not all(isinstance(c, bytes) for c in self.chunks):
            raise TypeError("SealedTensor.chunks must all be bytes")
        if not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"SealedTensor.length must be a positive int, got {self.length!r}")
        if any(s < 1 for s in self.shape):
            raise ValueError(f"SealedTensor.shape {self.shape} must hold positive dimensions")
        if math.prod(self.shape) != self.length:
            raise ValueError(f"SealedTensor.shape {self.shape} holds {math.prod(self.shape)} elements, not length {self.length}")
        torch_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        """Total size of the wire chunks in bytes."""
        return sum(len(c) for c in self.chunks)

    def meta_entry(self) -> dict[str, Any]:
        """The public description stored under ``meta["sealed." + name]``."""
        return {
            "scheme": self.scheme,
            "length": self.length,
            "shape": list(self.shape),
            "dtype": self.dtype,
            **self.params,
        }

    def to_payload(self, name: str) -> tuple[dict[str, list[bytes]], dict[str, Any]]:
        """Return ``(payload, meta)`` updates that store this value as field ``name``.

        Use as ``msg.with_payload(**payload).with_meta(**meta)``, or simply :meth:`attach`.
        """
        return {name: list(self.chunks)}, {META_PREFIX + name: self.meta_entry()}

    def attach(self, msg: Message, name: str) -> Message:
        """Return a copy of ``msg`` with this value stored as field ``name``."""
        payload, meta = self.to_payload(name)
        return msg.with_payload(**payload).with_meta(**meta)

    @classmethod
    def from_message(cls, msg: Message, name: str) -> SealedTensor:
        """Read the sealed field ``name`` back from a message.

        Raises
        ------
        KeyError
            If the field is missing or is not sealed.
        ValueError
            If the field's meta is malformed.
        """
        entry = msg.meta.get(META_PREFIX + name)
        chunks = msg.payload.get(name)
        if entry is None or chunks is None:
            raise KeyError(
                f"message {msg.kind!r} from {msg.sender!r} has no sealed field {name!r} "
                f"(payload fields: {sorted(msg.payload)}, sealed: "
                f"{sorted(k[len(META_PREFIX) :] for k in msg.meta if k.startswith(META_PREFIX))})"
            )
        if isinstance(chunks, bytes):
            chunks = [chunks]
        if not isinstance(chunks, list) or not all(isinstance(c, bytes) for c in chunks):
            raise ValueError(
                f"sealed field {name!r} of message {msg.kind!r} from {msg.sender!r} must be list[bytes], "
                f"got {type(chunks).__name__}"
            )
        if not isinstance(entry, Mapping):
            raise ValueError(f"meta {META_PREFIX + name!r} of message from {msg.sender!r} must be a dict, got {entry!r}")
        try:
            params = {k: v for k, v in entry.items() if k not in {"scheme", "length", "shape", "dtype"}}
            return cls(
                chunks=tuple(chunks),
                length=int(entry["length"]),
                shape=tuple(int(s) for s in entry["shape"]),
                scheme=str(entry["scheme"]),
                dtype=str(entry.get("dtype", "float32")),
                params=params,
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(
                f"malformed sealed field {name!r} in message {msg.kind!r} from {msg.sender!r}: {exc} (meta: {dict(entry)!r})"
            ) from exc


@runtime_checkable
class Sealer(Protocol):
    """Something that turns a plaintext tensor into a :class:`SealedTensor` (an outbound layer's tool)."""

    def seal(self, tensor: torch.Tensor, *, field: str) -> SealedTensor: ...


@runtime_checkable
class Opener(Protocol):
    """Something that turns a :class:`SealedTensor` back into a tensor (a key holder)."""

    def open(self, sealed: SealedTensor) -> torch.Tensor: ...


def is_sealed(msg: Message, name: str) -> bool:
    """Return ``True`` if field ``name`` of ``msg`` is sealed."""
    return META_PREFIX + name in msg.meta and name in msg.payload


def attach(msg: Message, name: str, value: torch.Tensor | SealedTensor) -> Message:
    """Store an aggregate (plaintext or sealed) as field ``name`` of ``msg``.

    A protocol can forward whatever its aggregator returned without knowing
    whether secure aggregation is on.
    """
    if isinstance(value, SealedTensor):
        return value.attach(msg, name)
    if isinstance(value, torch.Tensor):
        return msg.with_payload(**{name: value})
    raise TypeError(f"cannot attach field {name!r} of type {type(value).__name__}; expected Tensor or SealedTensor")


def seal_field(msg: Message, name: str, sealer: Sealer) -> Message:
    """Replace the plaintext tensor field ``name`` of ``msg`` by its sealed form.

    This is the client-side step of an outbound encryption/masking layer.
    """
    return sealer.seal(msg.tensor(name), field=name).attach(msg, name)


def open_field(msg: Message, name: str, opener: Opener | None = None) -> torch.Tensor:
    """Return field ``name`` of ``msg`` as a plaintext tensor, opening it if it is sealed.

    Raises
    ------
    ValueError
        If the field is sealed and no ``opener`` (key holder) is given.
    """
    if is_sealed(msg, name):
        if opener is None:
            raise ValueError(
                f"field {name!r} of message {msg.kind!r} from {msg.sender!r} is sealed "
                f"({msg.meta[META_PREFIX + name].get('scheme')}); a key holder is needed to open it"
            )
        return opener.open(SealedTensor.from_message(msg, name))
    return msg.tensor(name)


def open_sealed_fields(msg: Message, opener: Opener) -> Message:
    """Return a copy of ``msg`` with every sealed field opened to a plaintext tensor.

    This is the participant-side inbound step of an encryption layer: after
    it, a protocol reads ``msg.tensor("consensus")`` exactly as it would
    without secure aggregation. The ``sealed.*`` meta entries are removed.
    """
    names = [k[len(META_PREFIX) :] for k in msg.meta if k.startswith(META_PREFIX) and k[len(META_PREFIX) :] in msg.payload]
    if not names:
        return msg
    opened = {name: opener.open(SealedTensor.from_message(msg, name)) for name in names}
    meta = {k: v for k, v in msg.meta.items() if not (k.startswith(META_PREFIX) and k[len(META_PREFIX) :] in opened)}
    return msg.with_payload(**opened).model_copy(update={"meta": meta})
