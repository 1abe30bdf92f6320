"""The CKKS contexts: :class:`KeyHolderContext` (the secret key) and :class:`PublicContext` (the aggregator's).

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
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal as ts
import torch

from securefl.core.sealed import SealedTensor, dtype_name, from_float64, to_float64, torch_dtype
from securefl.crypto.ckks.params import CkksParams
from securefl.crypto.ckks.vector import EncryptedVector
from securefl.crypto.ckks.wire import (
    _ENCRYPTION_TYPE_FIELD,
    _PUBLIC_MAGIC,
    _SECRET_MAGIC,
    _ckks_vector_message,
    _encryption_type,
    _frame,
    _pack_blob,
    _proto_fields,
    _proto_spans,
    _public_fingerprint,
    _unpack_blob,
    _varint,
)
from securefl.crypto.wire import SecretHolder

__all__ = ["KeyHolderContext", "PublicContext", "SecretKeyRequired", "seal_tensor"]

# The ``encryption_type`` TenSEAL writes for a symmetric (secret-key) context.
_SYMMETRIC = int(ts.ENCRYPTION_TYPE.SYMMETRIC.value)


class SecretKeyRequired(PermissionError):
    """Decryption was attempted with a context that holds no secret key."""



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
