"""The bytes of CKKS: securefl's chunk and key-blob framing, and TenSEAL's protobuf messages rewritten by hand.

Chunks. A flat vector of length ``L`` is packed densely into ``ceil(L / (N/2))``
CKKS vectors of ``N/2`` slots each. Each chunk goes on the wire as a 45-byte
securefl header followed by TenSEAL's ``serialize()`` bytes. The header carries
the chunk index and count, the total length, an 8-byte fingerprint of the public
key, and a truncated SHA-256 digest of header and body. The digest catches
corruption, truncation and mix-ups (which TenSEAL's parser often accepts
silently: SEAL's compressed stream has no checksum). It is **not** a MAC:
deliberate tampering is caught by the Ed25519 signature on the message
(:mod:`securefl.crypto.signing`).

Key blobs. A serialized context (public, or the committee's secret) is a short
securefl header, the :class:`~securefl.crypto.ckks.params.CkksParams` as JSON,
then TenSEAL's bytes.

Protobuf. TenSEAL's own messages are read and written here without TenSEAL's
protobuf classes: :meth:`KeyHolderContext.seal` re-frames a batched ciphertext as
the CKKSVector messages TenSEAL would have written, and the symmetric context is
loaded from a rewritten context message (:mod:`securefl.crypto.ckks.context`).

Nothing here imports TenSEAL: a context is only asked to ``serialize()`` itself.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from securefl.crypto.ckks.params import CkksParams

if TYPE_CHECKING:
    import tenseal as ts

# -- securefl's framing ----------------------------------------------------------------------------
_CHUNK_MAGIC = b"SFCK"
_CHUNK_VERSION = 1
# magic, version, index, count, total length, key fingerprint, digest
_CHUNK_HEADER = struct.Struct("<4sBIIQ8s16s")
_DIGEST_AT = _CHUNK_HEADER.size - 16

_PUBLIC_MAGIC = b"SFPC"
_SECRET_MAGIC = b"SFSK"
_BLOB_HEADER = struct.Struct("<4sBI")  # magic, version, length of params JSON


def _pack_blob(magic: bytes, params: CkksParams, body: bytes) -> bytes:
    meta = params.model_dump_json().encode()
    return _BLOB_HEADER.pack(magic, 1, len(meta)) + meta + body


def _unpack_blob(data: bytes, magic: bytes, what: str) -> tuple[CkksParams, bytes]:
    if not isinstance(data, bytes | bytearray) or len(data) < _BLOB_HEADER.size:
        raise ValueError(
            f"{what}: expected bytes made by securefl, got {type(data).__name__} of length "
            f"{len(data) if isinstance(data, bytes | bytearray) else '?'}"
        )
    got_magic, version, n = _BLOB_HEADER.unpack_from(data)
    if got_magic != magic or version != 1:
        raise ValueError(f"{what}: bad header (magic {got_magic!r}, version {version}); expected {magic!r} v1")
    start = _BLOB_HEADER.size
    params = CkksParams.model_validate(json.loads(bytes(data[start : start + n])))
    return params, bytes(data[start + n :])


def _public_fingerprint(ctx: ts.Context) -> bytes:
    # Deterministic for a given key pair (checked in the tests): the same public
    # key gives the same bytes, whoever serialises it.
    blob = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    return hashlib.sha256(b"securefl/ckks/public-key/v1" + blob).digest()[:8]


def _frame(index: int, count: int, length: int, fingerprint: bytes, body: Sequence[bytes | memoryview]) -> bytes:
    """One wire chunk: the securefl header (with the digest of header and body), then the TenSEAL bytes.

    ``body`` may come in parts; they are copied once, into the chunk.
    """
    prefix = _CHUNK_HEADER.pack(_CHUNK_MAGIC, _CHUNK_VERSION, index, count, length, fingerprint, b"")[:_DIGEST_AT]
    digest = hashlib.sha256(prefix)
    for part in body:
        digest.update(part)
    return b"".join([prefix, digest.digest()[:16], *body])


# -- TenSEAL's protobuf messages (tenseal/proto/tensors.proto) ------------------------------------
# TenSEAL encrypts the ciphertexts of one CKKSTensor on its own thread pool, but a CKKSVector's on
# the calling thread only, and it holds the GIL throughout. To encrypt the chunks of a vector on
# every core, :meth:`KeyHolderContext.seal` encrypts them as the columns of one batched CKKSTensor
# and re-frames each ciphertext as the CKKSVector message TenSEAL itself would have written for it
# (byte for byte; the tests check it): ``sizes = 1`` (packed uint32), ``ciphertexts = 2`` (bytes),
# ``scale = 3`` (double). A CKKSTensor message has ``ciphertexts = 2`` and ``scale = 3`` too.
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, int]]:
    """``(field number, start, end)`` of each field's value in a protobuf message (varint, 64-bit or
    length-delimited)."""
    for number, _, start, end in _proto_spans(buf):
        yield number, start, end


def _proto_spans(buf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, start of its key, start of its value, end)`` of each field of a protobuf message."""
    i, n = 0, len(buf)
    while i < n:
        at = i
        key, i = _read_varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, end = _read_varint(buf, i)
        elif wire_type == 1:
            end = i + 8
        elif wire_type == 2:
            size, i = _read_varint(buf, i)
            end = i + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type} at byte {i}")
        if end > n:
            raise ValueError(f"protobuf field {number} runs past the end ({end} > {n})")
        yield number, at, i, end
        i = end


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong protobuf varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def _ckks_vector_message(size: int, ciphertext: bytes | memoryview, scale_field: bytes) -> list[bytes | memoryview]:
    """The parts of TenSEAL's ``CKKSVectorProto`` for one ciphertext of ``size`` values."""
    sizes = _varint(size)
    return [b"\x0a" + _varint(len(sizes)) + sizes + b"\x12" + _varint(len(ciphertext)), ciphertext, b"\x19" + scale_field]


# ``TenSEALContextProto`` (tenseal/proto/tensealcontext.proto): ``encryption_type = 4`` (uint32;
# 0 asymmetric, the default and so not written, 1 symmetric).
_ENCRYPTION_TYPE_FIELD = 4


def _encryption_type(ctx: ts.Context) -> int:
    """The encryption type a TenSEAL context says it has in its own serialization."""
    blob = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    kind = 0
    for number, _, start, _end in _proto_spans(blob):
        if number == _ENCRYPTION_TYPE_FIELD:
            kind, _ = _read_varint(blob, start)
    return kind
