"""CKKS secure aggregation with TenSEAL.

Approximate homomorphic encryption (Cheon, Kim, Kim & Song, "Homomorphic
Encryption for Arithmetic of Approximate Numbers", ASIACRYPT 2017) through
TenSEAL (Benaissa et al., "TenSEAL: A Library for Encrypted Tensor Operations
Using Homomorphic Encryption", 2021; https://github.com/OpenMined/TenSEAL),
which wraps Microsoft SEAL.

Who holds what (privacy.md, "Secure aggregation"):

* :class:`KeyHolderContext` holds the **secret key**. Only participants (the
  key-holder committee, by default all of them) have one. It encrypts, decrypts
  and opens sealed aggregates. It refuses to be pickled or copied, and
  :func:`securefl.crypto.assert_wire_safe` rejects it, so it cannot reach the
  transport by accident. Sharing the committee key is an explicit, named call:
  :meth:`KeyHolderContext.export_secret_for_committee`.
* :class:`PublicContext` is made with TenSEAL's ``make_context_public()``. The
  aggregator holds it: it can add ciphertexts and multiply them by plaintext
  scalars or vectors, but it cannot decrypt.
* :class:`CkksAggregator` implements the aggregator interface that protocols
  use (``sum``/``mean``/``weighted_mean`` over reply messages) and returns a
  :class:`~securefl.core.sealed.SealedTensor` that the protocol forwards
  untouched and key holders open.

Packing. A flat vector of length ``L`` is packed densely into
``ceil(L / (N/2))`` CKKS vectors of ``N/2`` slots each. Each chunk goes on the
wire as a 45-byte securefl header followed by TenSEAL's ``serialize()`` bytes.
The header carries the chunk index and count, the total length, an 8-byte
fingerprint of the public key, and a truncated SHA-256 digest of header and
body. The digest catches corruption, truncation and mix-ups (which TenSEAL's
parser often accepts silently: SEAL's compressed stream has no checksum). It
is **not** a MAC: deliberate tampering is caught by the Ed25519 signature on
the message (:mod:`securefl.crypto.signing`).

Secret-key encryption. Participants encrypt with the **secret** key (SEAL's
symmetric encryption, ``c = (-a*s + m + e, a)`` with ``a`` uniform), not the
public key: it skips the public-key product ``u*pk + e'`` and is about twice as
fast to encrypt (measured with TenSEAL 0.3.18 at N = 8192: 2.1 ms against
4.7 ms per 4,096-slot chunk). Symmetric CKKS ciphertexts are as semantically
secure as public-key ones under RLWE (the public key is itself a symmetric
encryption of zero); only secret-key holders can produce them, and here those
are exactly the encrypting participants (the key-holder committee). A
symmetric ciphertext is an ordinary two-polynomial ciphertext: the aggregator
deserializes and adds it under its public-only context exactly like a
public-key one, and still cannot decrypt. The wire format does not change, so
peers encrypting either way interoperate. TenSEAL writes the full ciphertext,
not SEAL's "seeded" form (``a`` replaced by its PRNG seed, half the bytes):
TenSEAL's symmetric encryption fills a ``Ciphertext`` in place, which expands
the seed, so the bytes per float are those of a public-key ciphertext.
``KeyHolderContext(symmetric=False)`` encrypts with the public key instead.

Cores. :meth:`KeyHolderContext.seal` has TenSEAL encrypt a payload's chunks
on its thread pool (one thread per core unless ``threads`` says otherwise);
the bytes on the wire are the same as when each chunk is encrypted alone.
Serialization, deserialization and decryption stay on the calling thread:
TenSEAL offers them no pool and holds the GIL while it runs them.

Threat model. The aggregator alone learns nothing about individual payloads
(semantic security of CKKS under RLWE). It does see the number of chunks,
hence the payload length. A participant holding the key could decrypt a peer's
intercepted ciphertext: channels must therefore be authenticated and encrypted
per pair, and distributed DP noise limits what any single ciphertext reveals.
CKKS decryption of an aggregate also leaks a little about the noise, and hence
about the secret key, to whoever sees the decrypted value (Li & Micciancio,
EUROCRYPT 2021): decrypted aggregates stay with the key holders.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tenseal as ts
import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from securefl.core.message import Message
from securefl.core.sealed import SealedTensor, dtype_name, from_float64, to_float64, torch_dtype
from securefl.crypto.errors import CiphertextError
from securefl.crypto.wire import SecretHolder

__all__ = [
    "CkksAggregator",
    "CkksParams",
    "EncryptedVector",
    "KeyHolderContext",
    "PublicContext",
    "SecretKeyRequired",
    "seal_tensor",
]

# Largest total coefficient-modulus size (bits) that keeps 128-bit security for
# each ring dimension (HomomorphicEncryption.org standard, as enforced by SEAL).
_MAX_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}

_CHUNK_MAGIC = b"SFCK"
_CHUNK_VERSION = 1
# magic, version, index, count, total length, key fingerprint, digest
_CHUNK_HEADER = struct.Struct("<4sBIIQ8s16s")
_DIGEST_AT = _CHUNK_HEADER.size - 16

_PUBLIC_MAGIC = b"SFPC"
_SECRET_MAGIC = b"SFSK"
_BLOB_HEADER = struct.Struct("<4sBI")  # magic, version, length of params JSON


class SecretKeyRequired(PermissionError):
    """Decryption was attempted with a context that holds no secret key."""


class CkksParams(BaseModel):
    """CKKS encryption parameters.

    The defaults (``N = 8192``, primes ``(60, 40, 40, 60)``, scale ``2^40``) give
    128-bit security, 4,096 slots per ciphertext and two rescale levels, which
    is what secure aggregation needs: additions, and one multiplication by a
    plaintext (``mean``, ``weighted_mean``) with one level to spare (e.g. a
    per-element ``1/count`` after a weighted sum).

    Precision (measured with TenSEAL 0.3.18 on these defaults, 3 repetitions of
    10 vectors of 4,096 values drawn uniformly from [-10, 10]):

    * sum of 10 ciphertexts: max abs error at most 2.7e-8 (documented tolerance 1e-6);
    * mean (sum times plaintext 1/10, then rescale): max abs error at most 9.5e-7
      (documented tolerance 1e-5).

    ``tests/crypto/test_crypto_ckks.py`` checks both tolerances.

    ``N = 4096`` with ``(40, 20, 40)`` and scale ``2^20`` is accepted but much
    coarser (max abs error 1.3e-2 for the sum, 1e-1 for the mean).

    Range. After a rescale only the first prime is left, so an aggregate must
    satisfy ``|x| < 2^(first_bits - global_scale_bits - 1)``, i.e. ``|x| < 2^19``
    with the defaults. :attr:`max_abs_value` returns this bound;
    :meth:`KeyHolderContext.encrypt` rejects inputs beyond it.

    Rules checked (each error names the field and the bad value): the degree
    is a power of two in {4096, 8192, 16384, 32768}; the total modulus stays
    within the 128-bit-security budget for that degree; there are at least 3
    primes (one rescale level); every prime is 20..60 bits; the inner primes
    equal ``global_scale_bits`` (so a rescale returns to the same scale); the
    first prime is larger than the scale (room for the integer part); and the
    last (special) prime is at least as large as any other.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40

    @field_validator("poly_modulus_degree")
    @classmethod
    def _degree(cls, value: int) -> int:
        if value <= 0 or value & (value - 1):
            raise ValueError(f"poly_modulus_degree must be a power of two, got {value}")
        if value not in _MAX_BITS_128:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(_MAX_BITS_128)}, got {value}")
        return value

    @field_validator("global_scale_bits")
    @classmethod
    def _scale(cls, value: int) -> int:
        if not 20 <= value <= 60:
            raise ValueError(f"global_scale_bits must be in [20, 60], got {value}")
        return value

    @field_validator("coeff_mod_bit_sizes")
    @classmethod
    def _primes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) < 3:
            raise ValueError(f"coeff_mod_bit_sizes needs at least 3 primes (one rescale level for mean), got {value}")
        bad = [b for b in value if not 20 <= b <= 60]
        if bad:
            raise ValueError(f"coeff_mod_bit_sizes entries must be in [20, 60] bits, got {bad} in {value}")
        return value

    @model_validator(mode="after")
    def _combination(self) -> CkksParams:
        sizes = self.coeff_mod_bit_sizes
        budget = _MAX_BITS_128[self.poly_modulus_degree]
        if sum(sizes) > budget:
            raise ValueError(
                f"coeff_mod_bit_sizes {sizes} total {sum(sizes)} bits, above the 128-bit-security maximum "
                f"of {budget} for poly_modulus_degree={self.poly_modulus_degree}"
            )
        inner = sizes[1:-1]
        if any(b != self.global_scale_bits for b in inner):
            raise ValueError(
                f"coeff_mod_bit_sizes {sizes}: the inner primes {inner} must all equal "
                f"global_scale_bits={self.global_scale_bits} so that a rescale keeps the scale"
            )
        if sizes[0] <= self.global_scale_bits:
            raise ValueError(
                f"coeff_mod_bit_sizes {sizes}: the first prime ({sizes[0]} bits) must exceed "
                f"global_scale_bits={self.global_scale_bits} to hold the integer part of results"
            )
        if sizes[-1] < max(sizes[:-1]):
            raise ValueError(
                f"coeff_mod_bit_sizes {sizes}: the last (special) prime ({sizes[-1]} bits) must be at least "
                f"as large as every other prime ({max(sizes[:-1])} bits)"
            )
        return self

    @property
    def slots(self) -> int:
        """Number of values packed in one ciphertext (``N / 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def max_abs_value(self) -> float:
        """Largest magnitude that an (aggregated) value may have to decrypt correctly."""
        return float(2.0 ** (self.coeff_mod_bit_sizes[0] - self.global_scale_bits - 1))

    def n_chunks(self, length: int) -> int:
        """Number of ciphertexts needed for a flat vector of ``length`` values."""
        return max(1, math.ceil(length / self.slots))


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


# ``TenSEALContextProto`` (tenseal/proto/tensealcontext.proto): ``encryption_type = 4`` (uint32;
# 0 asymmetric, the default and so not written, 1 symmetric).
_ENCRYPTION_TYPE_FIELD = 4
_SYMMETRIC = int(ts.ENCRYPTION_TYPE.SYMMETRIC.value)


def _encryption_type(ctx: ts.Context) -> int:
    """The encryption type a TenSEAL context says it has in its own serialization."""
    blob = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    kind = 0
    for number, _, start, _end in _proto_spans(blob):
        if number == _ENCRYPTION_TYPE_FIELD:
            kind, _ = _read_varint(blob, start)
    return kind


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


class _CkksContext:
    """Common part of the key-holder and public contexts."""

    def __init__(self, ctx: ts.Context, params: CkksParams) -> None:
        self._ctx = ctx
        self.params = params
        self._fingerprint: bytes | None = None

    @property
    def tenseal_context(self) -> ts.Context:
        """The underlying TenSEAL context (for benchmarks and tests)."""
        return self._ctx

    @property
    def fingerprint(self) -> bytes:
        """8 bytes identifying the key pair; stamped on every wire chunk."""
        if self._fingerprint is None:
            self._fingerprint = _public_fingerprint(self._ctx)
        return self._fingerprint

    @property
    def holds_secret_key(self) -> bool:
        return bool(self._ctx.is_private())

    # -- homomorphic operations (no secret key needed) ------------------------------------------
    def add(self, *vectors: EncryptedVector) -> EncryptedVector:
        """Return the element-wise sum of encrypted vectors of the same length."""
        if not vectors:
            raise ValueError("add() needs at least one EncryptedVector")
        total = vectors[0].copy()
        for vec in vectors[1:]:
            total += vec
        return total

    def multiply(self, vec: EncryptedVector, factor: float | np.ndarray | torch.Tensor) -> EncryptedVector:
        """Multiply by a public plaintext scalar or vector (uses one rescale level)."""
        return vec * factor


class PublicContext(_CkksContext):
    """A CKKS context without the secret key: what the aggregator holds.

    Make it with :meth:`KeyHolderContext.public` (which calls TenSEAL's
    ``make_context_public()``) and ship it with :meth:`to_bytes` /
    :meth:`from_bytes`. It can add ciphertexts and multiply them by plaintext;
    :meth:`decrypt` raises :class:`SecretKeyRequired`.
    """

    def __init__(self, ctx: ts.Context, params: CkksParams) -> None:
        if ctx.is_private():
            raise ValueError("PublicContext was given a TenSEAL context that holds the secret key")
        super().__init__(ctx, params)

    def decrypt(self, enc: EncryptedVector) -> np.ndarray:
        """Always fails: the aggregator cannot decrypt."""
        raise SecretKeyRequired(
            "PublicContext holds no secret key and cannot decrypt; only the key-holder committee "
            "(a KeyHolderContext) can open ciphertexts"
        )

    def open(self, sealed: SealedTensor) -> torch.Tensor:
        """Always fails, like :meth:`decrypt`."""
        raise SecretKeyRequired(
            "PublicContext holds no secret key and cannot open a sealed tensor; forward it to the key holders"
        )

    def to_bytes(self) -> bytes:
        """Serialize the public context (parameters + public key; no relinearization or Galois keys)."""
        body = self._ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
        return _pack_blob(_PUBLIC_MAGIC, self.params, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicContext:
        """Load a context made by :meth:`to_bytes`; refuses bytes that contain a secret key."""
        params, body = _unpack_blob(data, _PUBLIC_MAGIC, "PublicContext.from_bytes")
        try:
            ctx = ts.context_from(body)
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises ValueError or RuntimeError
            raise ValueError(f"PublicContext.from_bytes: TenSEAL could not load the context ({exc})") from exc
        if ctx.is_private():
            raise ValueError("PublicContext.from_bytes: these bytes contain a secret key; refusing to load them")
        ctx.global_scale = 2.0**params.global_scale_bits
        return cls(ctx, params)

    def __repr__(self) -> str:
        return f"PublicContext({self.params!r}, fingerprint={self.fingerprint.hex()})"

    def __reduce__(self) -> Any:
        raise TypeError("PublicContext is not picklable (TenSEAL objects never are); send PublicContext.to_bytes()")


class KeyHolderContext(SecretHolder, _CkksContext):
    """A CKKS context holding the secret key: for participants / the key-holder committee only.

    It cannot be pickled, copied, or pass :func:`~securefl.crypto.assert_wire_safe`.
    """

    _secret_kind = "CKKS secret key"
    _export_hint = "use export_secret_for_committee() to share the key among key holders explicitly"

    def __init__(
        self, ctx: ts.Context, params: CkksParams, *, threads: int | None = None, symmetric: bool = True
    ) -> None:
        """``threads``: the size of ``ctx``'s TenSEAL thread pool, if it was made with one
        (TenSEAL's default is one thread per core). ``symmetric``: encrypt with the secret key
        (the default; see the module docstring) rather than the public key."""
        if not ctx.is_private():
            raise ValueError("KeyHolderContext needs a TenSEAL context that holds the secret key")
        super().__init__(ctx, params)
        self._public: PublicContext | None = None
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        self.symmetric = bool(symmetric)
        self._encryptor: ts.Context | None = None

    @classmethod
    def generate(
        cls, params: CkksParams | None = None, *, threads: int | None = None, symmetric: bool = True
    ) -> KeyHolderContext:
        """Generate a fresh key pair.

        In simulation, generate once and hand the same key to every committee
        member (directly, or via :meth:`export_secret_for_committee`).
        ``threads``: how many threads TenSEAL may encrypt a payload's chunks on
        (default: one per core; 1 encrypts them one after another).
        ``symmetric``: encrypt with the secret key (default) or the public key.
        """
        params = params or CkksParams()
        try:
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                n_threads=threads,
            )
        except Exception as exc:  # noqa: BLE001 - SEAL cannot always find primes of the asked sizes
            raise ValueError(f"TenSEAL rejected CKKS parameters {params!r}: {exc}") from exc
        ctx.global_scale = 2.0**params.global_scale_bits
        return cls(ctx, params, threads=threads, symmetric=symmetric)

    def public(self) -> PublicContext:
        """Return the public context for the aggregator (TenSEAL's ``make_context_public()``)."""
        if self._public is None:
            ctx = self._ctx.copy()
            ctx.make_context_public()
            self._public = PublicContext(ctx, self.params)
        return self._public

    # -- committee key sharing ----------------------------------------------------------------
    def export_secret_for_committee(self) -> bytes:
        """Serialize **including the secret key**, to give the same key to every committee member.

        These bytes must only travel over an authenticated, encrypted channel
        to another key holder (or stay in-process in simulation); never to the
        aggregator.
        """
        body = self._ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
        return _pack_blob(_SECRET_MAGIC, self.params, body)

    @classmethod
    def from_committee_secret(
        cls, data: bytes, *, threads: int | None = None, symmetric: bool = True
    ) -> KeyHolderContext:
        """Load a key exported by :meth:`export_secret_for_committee` (``threads``, ``symmetric`` as in
        :meth:`generate`)."""
        params, body = _unpack_blob(data, _SECRET_MAGIC, "KeyHolderContext.from_committee_secret")
        try:
            ctx = ts.context_from(body, n_threads=threads)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"KeyHolderContext.from_committee_secret: TenSEAL could not load the key ({exc})") from exc
        ctx.global_scale = 2.0**params.global_scale_bits
        return cls(ctx, params, threads=threads, symmetric=symmetric)

    # -- encryption -----------------------------------------------------------------------------
    @property
    def encryption_context(self) -> ts.Context:
        """The TenSEAL context that encrypts: a symmetric one holding this secret key, or the key pair's.

        If this TenSEAL cannot make the symmetric context, encryption falls back to the public key
        (with a warning) and :attr:`symmetric` becomes ``False``.
        """
        if not self.symmetric:
            return self._ctx
        if self._encryptor is None:
            try:
                self._encryptor = self._symmetric_context()
            except Exception as exc:  # noqa: BLE001 - an unexpected TenSEAL: encrypt with the public key
                warnings.warn(f"CKKS: secret-key encryption unavailable ({exc}); encrypting with the public key",
                              RuntimeWarning, stacklevel=2)
                self.symmetric = False
                return self._ctx
        return self._encryptor

    def _symmetric_context(self) -> ts.Context:
        """A TenSEAL context in symmetric mode holding this context's secret key (and no public key).

        TenSEAL makes a symmetric context only with a fresh key, so this one is loaded from this
        context's own serialization with its ``encryption_type`` set to symmetric. Refused unless
        TenSEAL reports it symmetric and this context decrypts what it encrypts.
        """
        blob = self._ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False,
                                   save_relin_keys=False)
        kept = [blob[at:end] for number, at, _, end in _proto_spans(blob) if number != _ENCRYPTION_TYPE_FIELD]
        field = _varint(_ENCRYPTION_TYPE_FIELD << 3) + _varint(_SYMMETRIC)
        ctx = ts.context_from(b"".join([*kept, field]), n_threads=self.threads)
        ctx.global_scale = 2.0**self.params.global_scale_bits
        if not ctx.is_private() or _encryption_type(ctx) != _SYMMETRIC:
            raise RuntimeError("TenSEAL did not load the secret key as a symmetric context")
        probe = np.linspace(-1.0, 1.0, 8)
        echo = ts.ckks_vector_from(self._ctx, ts.CKKSVector(ctx, probe.tolist()).serialize()).decrypt()
        if np.abs(np.asarray(echo, dtype=np.float64) - probe).max() > 1e-4:
            raise RuntimeError("the symmetric context does not hold this context's secret key")
        return ctx

    def encrypt(self, values: np.ndarray | torch.Tensor | Sequence[float]) -> EncryptedVector:
        """Encrypt a tensor/array of any shape, packed densely into ``ceil(L / (N/2))`` ciphertexts.

        Raises
        ------
        ValueError
            If a value is NaN/Inf or exceeds :attr:`CkksParams.max_abs_value`
            (CKKS would silently wrap it into garbage).
        """
        flat, shape = self._plaintext(values)
        slots = self.params.slots
        ctx = self.encryption_context
        chunks = [ts.ckks_vector(ctx, flat[i : i + slots]) for i in range(0, flat.size, slots)]
        return EncryptedVector(self, chunks, length=int(flat.size), shape=shape)

    def _plaintext(self, values: np.ndarray | torch.Tensor | Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``values`` flattened to float64, and their shape; ValueError for what :meth:`encrypt` refuses."""
        arr = to_float64(values)
        shape = tuple(arr.shape)
        flat = arr.reshape(-1)
        if flat.size == 0:
            raise ValueError("cannot encrypt an empty vector")
        if not np.isfinite(flat).all():
            bad = int(np.flatnonzero(~np.isfinite(flat))[0])
            raise ValueError(f"cannot encrypt non-finite value {flat[bad]} at flat index {bad}")
        bound = self.params.max_abs_value
        peak = int(np.argmax(np.abs(flat)))
        if abs(flat[peak]) >= bound:
            raise ValueError(
                f"value {flat[peak]} at flat index {peak} exceeds the CKKS range |x| < {bound:g} for "
                f"coeff_mod_bit_sizes={self.params.coeff_mod_bit_sizes}, global_scale_bits={self.params.global_scale_bits}"
            )
        return flat, shape

    def _encrypt_serialized(self, flat: np.ndarray) -> list[list[bytes | memoryview]]:
        """Each chunk of ``flat`` encrypted and serialized as TenSEAL's CKKSVector (in parts).

        The same bytes as ``ts.ckks_vector(ctx, chunk).serialize()`` for every chunk, but with more
        than one thread the chunks are encrypted in parallel (see :func:`_ckks_vector_message`).
        """
        slots = self.params.slots
        n = self.params.n_chunks(flat.size)
        if n > 1 and self.threads > 1:
            bodies = self._encrypt_batched(flat, n)
            if bodies is not None:
                return bodies
        ctx = self.encryption_context
        return [[ts.ckks_vector(ctx, flat[i : i + slots]).serialize()] for i in range(0, flat.size, slots)]

    def _encrypt_batched(self, flat: np.ndarray, n: int) -> list[list[bytes | memoryview]] | None:
        slots = self.params.slots
        columns = np.empty((slots, n), dtype=np.float64)
        full = flat.size // slots
        columns[:, :full] = flat[: full * slots].reshape(full, slots).T
        if full < n:
            # A CKKSVector repeats a short chunk cyclically over all its slots before encoding it.
            columns[:, full] = np.resize(flat[full * slots :], slots)
        blob = ts.ckks_tensor(self.encryption_context, ts.plain_tensor(columns), batch=True).serialize()
        view = memoryview(blob)
        ciphertexts, scale = [], None
        try:
            for number, start, end in _proto_fields(blob):
                if number == 2:
                    ciphertexts.append(view[start:end])
                elif number == 3 and end - start == 8:
                    scale = blob[start:end]
        except ValueError:
            return None
        if len(ciphertexts) != n or scale is None:
            return None  # not the message this TenSEAL version was checked against: encrypt chunk by chunk
        return [
            _ckks_vector_message(min(slots, flat.size - i * slots), ciphertext, scale)
            for i, ciphertext in enumerate(ciphertexts)
        ]

    def decrypt(self, enc: EncryptedVector) -> np.ndarray:
        """Decrypt to a float64 array of the vector's shape."""
        parts = [np.asarray(chunk.decrypt(), dtype=np.float64) for chunk in enc.chunks]
        flat = np.concatenate(parts)[: enc.length]
        return flat.reshape(enc.shape)

    # -- sealed tensors (the Sealer / Opener protocols) ----------------------------------------
    def seal(self, tensor: torch.Tensor, *, field: str | None = None) -> SealedTensor:
        """Encrypt a tensor into a :class:`SealedTensor` for a message payload (``field`` is unused).

        The chunks are what ``self.encrypt(tensor).to_wire()`` gives, without building the
        ciphertext objects that only serialize would read.
        """
        flat, shape = self._plaintext(tensor)
        bodies = self._encrypt_serialized(flat)
        fp = self.fingerprint
        return SealedTensor(
            chunks=tuple(_frame(i, len(bodies), flat.size, fp, body) for i, body in enumerate(bodies)),
            length=int(flat.size),
            shape=shape,
            scheme="ckks",
            dtype=dtype_name(tensor.dtype),
        )

    def open(self, sealed: SealedTensor) -> torch.Tensor:
        """Decrypt a :class:`SealedTensor` (e.g. an aggregate forwarded by a protocol) to a tensor."""
        if sealed.scheme != "ckks":
            raise ValueError(f"KeyHolderContext can only open scheme 'ckks', got {sealed.scheme!r}")
        enc = EncryptedVector.from_wire(self, sealed.chunks, length=sealed.length, shape=sealed.shape)
        return from_float64(self.decrypt(enc), torch_dtype(sealed.dtype))

    def __repr__(self) -> str:
        return f"KeyHolderContext({self.params!r}, fingerprint={self.fingerprint.hex()}, secret key hidden)"


def seal_tensor(key_ctx: KeyHolderContext, tensor: torch.Tensor) -> SealedTensor:
    """Encrypt ``tensor`` for the wire: ``sealed.chunks`` are the bytes, ``sealed.meta_entry()`` the meta.

    An outbound layer replaces a plaintext field with
    ``seal_tensor(ctx, msg.tensor(name)).attach(msg, name)``
    (or :func:`securefl.core.sealed.seal_field`).
    """
    return key_ctx.seal(tensor)


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


Weights = Sequence[float] | Mapping[str, float] | torch.Tensor | np.ndarray


def _normalised_weights(replies: Sequence[Message], weights: Weights) -> list[float]:
    """Resolve weights (aligned list, or mapping sender -> weight) and normalise them to sum 1."""
    if isinstance(weights, Mapping):
        missing = [r.sender for r in replies if r.sender not in weights]
        if missing:
            raise ValueError(f"weighted_mean: no weight for senders {missing} (weights given for {sorted(weights)})")
        raw = [float(weights[r.sender]) for r in replies]
    else:
        if isinstance(weights, torch.Tensor):
            weights = weights.detach().cpu().tolist()
        raw = [float(w) for w in weights]
        if len(raw) != len(replies):
            raise ValueError(f"weighted_mean: {len(raw)} weights for {len(replies)} replies")
    for reply, w in zip(replies, raw, strict=True):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weighted_mean: weight of {reply.sender!r} must be finite and >= 0, got {w}")
    total = math.fsum(raw)
    if total <= 0:
        raise ValueError(f"weighted_mean: weights sum to {total}; at least one must be positive")
    return [w / total for w in raw]


def _contributors(replies: Sequence[Message]) -> dict[str, Any]:
    """The public facts an aggregate carries: how many replies it sums, and whose. A key holder opens no
    aggregate of fewer than the run's minimum cohort (:mod:`securefl.privacy.cohort`), and an individual
    upload, which carries no such list, not at all."""
    return {"n": len(replies), "contributors": sorted(r.sender for r in replies)}


class CkksAggregator:
    """The aggregator interface over CKKS ciphertexts; holds only a :class:`PublicContext`.

    Every reply carries field ``field`` as a sealed CKKS tensor (see
    :func:`seal_tensor`). Results are :class:`SealedTensor` values: a protocol
    forwards them in a message untouched (``result.attach(msg, name)``) and key
    holders open them (``key_ctx.open(SealedTensor.from_message(msg, name))``).
    """

    name = "ckks"
    scheme = "ckks"

    def __init__(self, public_ctx: PublicContext) -> None:
        if isinstance(public_ctx, KeyHolderContext):
            raise TypeError("CkksAggregator must be given a PublicContext; a KeyHolderContext holds the secret key")
        if not isinstance(public_ctx, PublicContext):
            raise TypeError(f"CkksAggregator needs a PublicContext, got {type(public_ctx).__name__}")
        self.ctx = public_ctx
        # Vectors the server's inbound check already deserialized and validated, by (sender, field):
        # parsing a reply costs as much as adding it, so it is done once per reply, not twice.
        self._parsed: dict[tuple[str, str], tuple[tuple[bytes, ...], EncryptedVector]] = {}

    def hand_over(self, sender: str, field: str, sealed: SealedTensor, vector: EncryptedVector) -> None:
        """Keep ``vector``, parsed from ``sealed`` with :meth:`EncryptedVector.from_wire`, for one aggregation."""
        self._parsed[(sender, field)] = (sealed.chunks, vector)

    def forget_parsed(self) -> None:
        self._parsed.clear()

    def _parsed_vector(self, sender: str, field: str, sealed: SealedTensor) -> EncryptedVector | None:
        """The handed-over vector of exactly these chunk objects (bytes are immutable), used up on use."""
        entry = self._parsed.pop((sender, field), None)
        if entry is None:
            return None
        chunks, vector = entry
        same = len(chunks) == len(sealed.chunks) and all(a is b for a, b in zip(chunks, sealed.chunks, strict=True))
        if not same or (vector.length, vector.shape) != (sealed.length, tuple(sealed.shape)):
            return None
        return vector

    def _load(self, replies: Sequence[Message], field: str) -> tuple[list[EncryptedVector], SealedTensor]:
        if not replies:
            raise ValueError(f"no replies to aggregate for field {field!r}")
        senders = [r.sender for r in replies]
        dupes = sorted({s for s in senders if senders.count(s) > 1})
        if dupes:
            raise ValueError(f"field {field!r}: several replies from {dupes}; each participant counts once")
        loaded: list[EncryptedVector] = []
        first: SealedTensor | None = None
        for reply in replies:
            sealed = SealedTensor.from_message(reply, field)
            if sealed.scheme != "ckks":
                raise ValueError(f"reply from {reply.sender!r}, field {field!r}: scheme {sealed.scheme!r}, expected 'ckks'")
            if first is None:
                first = sealed
            elif (sealed.shape, sealed.dtype) != (first.shape, first.dtype):
                raise ValueError(
                    f"field {field!r}: reply from {reply.sender!r} has shape {sealed.shape} ({sealed.dtype}), "
                    f"reply from {replies[0].sender!r} has shape {first.shape} ({first.dtype})"
                )
            parsed = self._parsed_vector(reply.sender, field, sealed)
            if parsed is not None:
                loaded.append(parsed)
                continue
            try:
                loaded.append(EncryptedVector.from_wire(self.ctx, sealed.chunks, sealed.length, sealed.shape))
            except CiphertextError as exc:
                raise CiphertextError(f"reply from {reply.sender!r}, field {field!r}: {exc}") from exc
        assert first is not None
        return loaded, first

    def _seal(self, enc: EncryptedVector, like: SealedTensor, **params: Any) -> SealedTensor:
        return SealedTensor(
            chunks=tuple(enc.to_wire()),
            length=enc.length,
            shape=enc.shape,
            scheme="ckks",
            dtype=like.dtype,
            params=params,
        )

    def sum(self, replies: Sequence[Message], field: str) -> SealedTensor:
        """Encrypted element-wise sum of field ``field`` over the replies."""
        vectors, like = self._load(replies, field)
        total = vectors[0]
        for vec in vectors[1:]:
            total += vec
        return self._seal(total, like, **_contributors(replies))

    def mean(self, replies: Sequence[Message], field: str) -> SealedTensor:
        """Encrypted unweighted mean: the sum times the plaintext ``1/n``."""
        vectors, like = self._load(replies, field)
        total = vectors[0]
        for vec in vectors[1:]:
            total += vec
        return self._seal(total * (1.0 / len(vectors)), like, **_contributors(replies))

    def weighted_mean(self, replies: Sequence[Message], field: str, weights: Weights) -> SealedTensor:
        """Encrypted weighted mean with public weights.

        Each ciphertext is multiplied by its normalised plaintext weight
        ``w_k / sum(w)``, then the products are summed.

        Parameters
        ----------
        weights
            One weight per reply, aligned with ``replies``, or a mapping
            ``sender -> weight``. Weights are public, finite and ``>= 0``.
        """
        norm = _normalised_weights(replies, weights)
        vectors, like = self._load(replies, field)
        total = vectors[0] * norm[0]
        for vec, w in zip(vectors[1:], norm[1:], strict=True):
            total += vec * w
        return self._seal(total, like, **_contributors(replies))

    def scale(self, sealed: SealedTensor, factor: float | np.ndarray | torch.Tensor) -> SealedTensor:
        """Multiply a sealed sum by a public plaintext (e.g. a per-element ``1 / count``).

        Only valid on a value that has not been rescaled yet (a :meth:`sum`).
        """
        enc = EncryptedVector.from_wire(self.ctx, sealed.chunks, sealed.length, sealed.shape)
        return self._seal(enc * factor, sealed, **dict(sealed.params))
