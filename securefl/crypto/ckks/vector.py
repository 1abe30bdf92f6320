"""An encrypted vector: a flat vector as a list of CKKS ciphertexts, and its wire chunks.

The chunks' framing is :mod:`securefl.crypto.ckks.wire`'s; :meth:`EncryptedVector.from_wire` checks every
chunk's header, digest, key and size before TenSEAL parses it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tenseal as ts
import torch

from securefl.core.sealed import to_float64
from securefl.crypto.ckks.wire import _CHUNK_HEADER, _CHUNK_MAGIC, _CHUNK_VERSION, _DIGEST_AT, _frame
from securefl.crypto.errors import CiphertextError

if TYPE_CHECKING:
    from securefl.crypto.ckks.context import KeyHolderContext, PublicContext, _CkksContext

__all__ = ["EncryptedVector"]


class EncryptedVector:
    """A flat vector encrypted as a list of CKKS vectors (dense packing, ``N/2`` slots each).

    Parameters
    ----------
    ctx
        The context the chunks are linked to.
    chunks
        TenSEAL ``CKKSVector`` objects; all but the last are full.
    length
        Number of real values (the last chunk may be partly filled).
    shape
        Shape of the plaintext.
    """

    def __init__(self, ctx: _CkksContext, chunks: Sequence[Any], *, length: int, shape: Sequence[int]) -> None:
        self.ctx = ctx
        self.chunks = list(chunks)
        self.length = int(length)
        self.shape = tuple(int(s) for s in shape)
        expected = ctx.params.n_chunks(self.length)
        if len(self.chunks) != expected:
            raise CiphertextError(
                f"{len(self.chunks)} chunks for length {self.length}; expected {expected} ({ctx.params.slots} slots per chunk)"
            )
        if math.prod(self.shape) != self.length:
            raise CiphertextError(f"shape {self.shape} holds {math.prod(self.shape)} values, not length {self.length}")

    def __len__(self) -> int:
        return self.length

    def copy(self) -> EncryptedVector:
        return EncryptedVector(self.ctx, [c.copy() for c in self.chunks], length=self.length, shape=self.shape)

    def _check_compatible(self, other: EncryptedVector) -> None:
        if not isinstance(other, EncryptedVector):
            raise TypeError(f"can only add an EncryptedVector, got {type(other).__name__}")
        if other.length != self.length or other.shape != self.shape:
            raise ValueError(
                f"cannot add encrypted vectors of shapes {self.shape} (length {self.length}) "
                f"and {other.shape} (length {other.length})"
            )

    def __add__(self, other: EncryptedVector) -> EncryptedVector:
        out = self.copy()
        out += other
        return out

    def __iadd__(self, other: EncryptedVector) -> EncryptedVector:
        self._check_compatible(other)
        for i, theirs in enumerate(other.chunks):
            self.chunks[i] += theirs
        return self

    def __mul__(self, factor: float | np.ndarray | torch.Tensor) -> EncryptedVector:
        """Multiply by a public plaintext scalar, or element-wise by a plaintext vector of the same length."""
        if isinstance(factor, int | float | np.floating | np.integer):
            f = float(factor)
            if not math.isfinite(f):
                raise ValueError(f"plaintext factor must be finite, got {factor}")
            return EncryptedVector(self.ctx, [c * f for c in self.chunks], length=self.length, shape=self.shape)
        arr = to_float64(factor).reshape(-1)
        if arr.size != self.length:
            raise ValueError(f"plaintext factor has {arr.size} values, the encrypted vector has {self.length}")
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise ValueError(f"plaintext factor has non-finite value {arr[bad]} at index {bad}")
        slots = self.ctx.params.slots
        out = [c * arr[i * slots : i * slots + c.size()].tolist() for i, c in enumerate(self.chunks)]
        return EncryptedVector(self.ctx, out, length=self.length, shape=self.shape)

    __rmul__ = __mul__

    # -- wire format ------------------------------------------------------------------------------
    def to_wire(self) -> list[bytes]:
        """Serialize every chunk (TenSEAL ``serialize()`` behind a 45-byte securefl header)."""
        n = len(self.chunks)
        fp = self.ctx.fingerprint
        return [_frame(i, n, self.length, fp, [chunk.serialize()]) for i, chunk in enumerate(self.chunks)]

    @classmethod
    def from_wire(
        cls, ctx: KeyHolderContext | PublicContext, chunks: Sequence[bytes], length: int, shape: Sequence[int]
    ) -> EncryptedVector:
        """Deserialize and validate wire chunks.

        Raises
        ------
        CiphertextError
            If the chunk count does not match ``length``, or a chunk is not
            bytes, has a bad header, is labelled for another position, length
            or key, fails its digest, cannot be parsed by TenSEAL, or holds the
            wrong number of slots. The message names the chunk and the reason.
        """
        params = ctx.params
        length = int(length)
        shape = tuple(int(s) for s in shape)
        if length < 1:
            raise CiphertextError(f"length must be positive, got {length}")
        if math.prod(shape) != length:
            raise CiphertextError(f"shape {shape} holds {math.prod(shape)} values, not length {length}")
        if isinstance(chunks, bytes | bytearray):
            raise CiphertextError("expected a list of chunks (list[bytes]), got a single bytes object")
        n = len(chunks)
        expected = params.n_chunks(length)
        if n != expected:
            raise CiphertextError(
                f"got {n} chunks for length {length}; expected {expected} (ceil({length} / {params.slots} slots))"
            )
        fp = ctx.fingerprint
        vectors = []
        for i, raw in enumerate(chunks):
            where = f"chunk {i} of {n}"
            if not isinstance(raw, bytes | bytearray):
                raise CiphertextError(f"{where}: expected bytes, got {type(raw).__name__}")
            if len(raw) <= _CHUNK_HEADER.size:
                raise CiphertextError(f"{where}: only {len(raw)} bytes, too short for a securefl ciphertext")
            magic, version, index, count, total, key, digest = _CHUNK_HEADER.unpack_from(raw)
            if magic != _CHUNK_MAGIC or version != _CHUNK_VERSION:
                raise CiphertextError(f"{where}: not a securefl CKKS chunk (magic {magic!r}, version {version})")
            if index != i or count != n:
                raise CiphertextError(f"{where}: labelled as chunk {index} of {count} (reordered or mixed up)")
            if total != length:
                raise CiphertextError(f"{where}: belongs to a vector of length {total}, not {length}")
            if key != fp:
                raise CiphertextError(
                    f"{where}: encrypted under key {key.hex()}, but this context's key is {fp.hex()} "
                    "(did every participant generate its own key instead of sharing the committee key?)"
                )
            body = bytes(raw[_CHUNK_HEADER.size :])
            check = hashlib.sha256(bytes(raw[:_DIGEST_AT]))
            check.update(body)
            if check.digest()[:16] != digest:
                raise CiphertextError(f"{where}: digest mismatch; the bytes were corrupted or tampered with")
            try:
                vec = ts.ckks_vector_from(ctx.tenseal_context, body)
            except Exception as exc:  # noqa: BLE001 - TenSEAL raises ValueError or RuntimeError
                raise CiphertextError(f"{where}: TenSEAL could not deserialize it ({exc})") from exc
            want = min(params.slots, length - i * params.slots)
            if vec.size() != want:
                raise CiphertextError(f"{where}: holds {vec.size()} slots, expected {want}")
            vectors.append(vec)
        return cls(ctx, vectors, length=length, shape=shape)

    def __repr__(self) -> str:
        return f"EncryptedVector(length={self.length}, shape={self.shape}, chunks={len(self.chunks)})"
