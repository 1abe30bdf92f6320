"""Participants encrypt with the committee's secret key (SEAL's symmetric CKKS encryption).

The aggregator holds only the public context: it must load, validate, add and scale these
ciphertexts like public-key ones, and still be unable to decrypt them.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import torch

from securefl.core.message import AGGREGATOR, Message
from securefl.core.sealed import SealedTensor
from securefl.crypto.ckks import EncryptedVector, KeyHolderContext, PublicContext, SecretKeyRequired
from securefl.crypto.ckks.wire import _encryption_type
from securefl.crypto.errors import CiphertextError
from securefl.layers.ckks_aggregator import CkksAggregator

SLOTS = 4096
SUM_TOL = 1e-6  # documented in CkksParams
MEAN_TOL = 1e-5
SYMMETRIC = int(ts.ENCRYPTION_TYPE.SYMMETRIC.value)
ASYMMETRIC = int(ts.ENCRYPTION_TYPE.ASYMMETRIC.value)


def _member(key_ctx: KeyHolderContext, **kwargs: object) -> KeyHolderContext:
    """Another committee member: the same key, loaded from the committee export."""
    return KeyHolderContext.from_committee_secret(key_ctx.export_secret_for_committee(), **kwargs)  # type: ignore[arg-type]


def _reply(sender: str, sealed: SealedTensor) -> Message:
    msg = Message(sender=sender, receiver=AGGREGATOR, run_id="r", round=1, kind="logits")
    return sealed.attach(msg, "logits")


def test_participants_encrypt_with_the_secret_key_by_default(key_ctx: KeyHolderContext) -> None:
    for ctx in (key_ctx, _member(key_ctx), _member(key_ctx, threads=1), KeyHolderContext.generate()):
        assert ctx.symmetric
        enc = ctx.encryption_context
        assert enc is not ctx.tenseal_context
        assert _encryption_type(enc) == SYMMETRIC
        with pytest.raises(ValueError, match="not supported for symmetric"):
            enc.public_key()
    # The key pair's own context, which the public context and the key fingerprint come from, is unchanged.
    assert _encryption_type(key_ctx.tenseal_context) == ASYMMETRIC
    assert key_ctx.tenseal_context.has_public_key()


def test_public_key_encryption_on_request(key_ctx: KeyHolderContext) -> None:
    asym = _member(key_ctx, symmetric=False)
    assert not asym.symmetric
    assert asym.encryption_context is asym.tenseal_context
    assert _encryption_type(asym.encryption_context) == ASYMMETRIC
    assert KeyHolderContext.generate(symmetric=False).encryption_context is not None


@pytest.mark.parametrize("threads", [1, 2])
def test_symmetric_ciphertexts_of_two_participants_add_up_at_a_public_only_aggregator(
    key_ctx: KeyHolderContext, threads: int
) -> None:
    alice, bob = _member(key_ctx, threads=threads), _member(key_ctx, threads=threads)
    public = PublicContext.from_bytes(key_ctx.public().to_bytes())
    assert not public.holds_secret_key
    length = 2 * SLOTS + 123  # batched path for threads=2, a short last chunk
    gen = torch.Generator().manual_seed(1)
    xa = torch.empty(length, dtype=torch.float64).uniform_(-10, 10, generator=gen)
    xb = torch.empty(length, dtype=torch.float64).uniform_(-10, 10, generator=gen)
    replies = [_reply("alice", alice.seal(xa)), _reply("bob", bob.seal(xb))]
    agg = CkksAggregator(public)

    total = agg.sum(replies, "logits")
    torch.testing.assert_close(alice.open(total), xa + xb, atol=SUM_TOL, rtol=0)
    torch.testing.assert_close(bob.open(agg.mean(replies, "logits")), (xa + xb) / 2, atol=MEAN_TOL, rtol=0)
    weighted = agg.weighted_mean(replies, "logits", {"alice": 3.0, "bob": 1.0})
    torch.testing.assert_close(key_ctx.open(weighted), 0.75 * xa + 0.25 * xb, atol=MEAN_TOL, rtol=0)
    factor = torch.linspace(0.5, 2.0, length, dtype=torch.float64)
    torch.testing.assert_close(key_ctx.open(agg.scale(total, factor)), (xa + xb) * factor, atol=MEAN_TOL, rtol=0)

    # The aggregator cannot decrypt, neither through securefl nor through TenSEAL itself.
    with pytest.raises(SecretKeyRequired):
        public.open(total)
    enc = EncryptedVector.from_wire(public, replies[0].payload["logits"], length, (length,))
    with pytest.raises(SecretKeyRequired):
        public.decrypt(enc)
    with pytest.raises(ValueError, match="secret"):
        enc.chunks[0].decrypt()


def test_symmetric_and_public_key_ciphertexts_mix(key_ctx: KeyHolderContext, public_ctx: PublicContext) -> None:
    """The wire format does not depend on the encryption type: old and new participants interoperate."""
    sym, asym = _member(key_ctx), _member(key_ctx, symmetric=False)
    x = torch.linspace(-4, 4, SLOTS + 9, dtype=torch.float64)
    replies = [_reply("sym", sym.seal(x)), _reply("asym", asym.seal(2 * x))]
    total = CkksAggregator(public_ctx).sum(replies, "logits")
    torch.testing.assert_close(asym.open(total), 3 * x, atol=SUM_TOL, rtol=0)
    torch.testing.assert_close(sym.open(total), 3 * x, atol=SUM_TOL, rtol=0)


def test_encrypt_links_chunks_to_the_symmetric_context(key_ctx: KeyHolderContext, public_ctx: PublicContext) -> None:
    x = np.linspace(-2, 2, SLOTS + 1)
    enc = key_ctx.encrypt(x)
    np.testing.assert_allclose(key_ctx.decrypt(enc), x, atol=SUM_TOL)
    # A public-key ciphertext of the same key adds to it.
    other = _member(key_ctx, symmetric=False).encrypt(x)
    np.testing.assert_allclose(key_ctx.decrypt(enc + other), 2 * x, atol=SUM_TOL)
    loaded = EncryptedVector.from_wire(public_ctx, enc.to_wire(), x.size, x.shape)
    np.testing.assert_allclose(key_ctx.decrypt(EncryptedVector.from_wire(key_ctx, loaded.to_wire(), x.size, x.shape)),
                               x, atol=SUM_TOL)


@pytest.mark.parametrize("threads", [1, 2])
def test_server_validation_rejects_broken_symmetric_chunks(key_ctx: KeyHolderContext, public_ctx: PublicContext,
                                                            threads: int) -> None:
    member = _member(key_ctx, threads=threads)
    length = 2 * SLOTS + 7
    chunks = list(member.seal(torch.linspace(-1, 1, length)).chunks)
    EncryptedVector.from_wire(public_ctx, chunks, length, (length,))
    for position in (50, 5_000, len(chunks[1]) // 2, -1):
        bad = bytearray(chunks[1])
        bad[position] ^= 0x01
        with pytest.raises(CiphertextError, match="chunk 1 of 3: digest mismatch"):
            EncryptedVector.from_wire(public_ctx, [chunks[0], bytes(bad), chunks[2]], length, (length,))
    with pytest.raises(CiphertextError, match="chunk 2 of 3: digest mismatch"):
        EncryptedVector.from_wire(public_ctx, [chunks[0], chunks[1], chunks[2][:-10]], length, (length,))
    other_key = KeyHolderContext.generate()
    with pytest.raises(CiphertextError, match="encrypted under key"):
        EncryptedVector.from_wire(other_key.public(), chunks, length, (length,))


def test_symmetric_chunks_are_full_ciphertexts_not_seeded(key_ctx: KeyHolderContext) -> None:
    """TenSEAL writes the whole second polynomial, not SEAL's seed: the bytes per float stay those of
    a public-key ciphertext (the module docstring says so; this fails if TenSEAL starts seeding)."""
    x = torch.linspace(-1, 1, 3 * SLOTS)
    sym = sum(len(c) for c in _member(key_ctx).seal(x).chunks)
    asym = sum(len(c) for c in _member(key_ctx, symmetric=False).seal(x).chunks)
    assert abs(sym - asym) / asym < 0.01


def test_a_symmetric_context_that_cannot_be_made_falls_back_to_the_public_key(
    key_ctx: KeyHolderContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from securefl.crypto.ckks import context

    member = _member(key_ctx)
    monkeypatch.setattr(context, "_encryption_type", lambda ctx: ASYMMETRIC)  # "TenSEAL ignored the field"
    with pytest.warns(RuntimeWarning, match="secret-key encryption unavailable"):
        sealed = member.seal(torch.linspace(-1, 1, 10))
    assert not member.symmetric
    assert member.encryption_context is member.tenseal_context
    torch.testing.assert_close(key_ctx.open(sealed), torch.linspace(-1, 1, 10), atol=SUM_TOL, rtol=0)


def test_the_symmetric_context_must_hold_the_same_key(key_ctx: KeyHolderContext,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    member = _member(key_ctx)
    stranger = KeyHolderContext.generate()
    real = ts.context_from
    # Loading a different key instead of ours must be caught by the decryption probe.
    monkeypatch.setattr(ts, "context_from", lambda data, n_threads=None: real(
        stranger.tenseal_context.serialize(save_secret_key=True) + b"\x20\x01", n_threads=n_threads))
    with pytest.raises(RuntimeError, match="does not hold this context's secret key"):
        member._symmetric_context()
