"""CKKS layer: parameters, precision, packing, who can decrypt, wire validation, the aggregator."""

from __future__ import annotations

import copy
import hashlib
import pickle
import struct

import numpy as np
import pytest
import tenseal as ts
import torch
from pydantic import ValidationError

from securefl.core.sealed import SealedTensor, attach, is_sealed
from securefl.crypto import assert_wire_safe, open_field, seal_field
from securefl.crypto.ckks import (
    CkksParams,
    EncryptedVector,
    KeyHolderContext,
    PublicContext,
    SecretKeyRequired,
    seal_tensor,
)
from securefl.crypto.errors import CiphertextError
from securefl.layers.ckks_aggregator import CkksAggregator

SLOTS = 4096  # N/2 for the default N = 8192
SUM_TOL = 1e-6  # documented in CkksParams
MEAN_TOL = 1e-5


# -- parameters ------------------------------------------------------------------------------------
def test_default_params_are_the_documented_ones() -> None:
    p = CkksParams()
    assert (p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.global_scale_bits) == (8192, (60, 40, 40, 60), 40)
    assert p.slots == SLOTS
    assert p.max_abs_value == 2.0**19


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"poly_modulus_degree": 5000}, ["poly_modulus_degree", "5000", "power of two"]),
        ({"poly_modulus_degree": 2048}, ["poly_modulus_degree", "2048"]),
        ({"coeff_mod_bit_sizes": (60, 40, 40, 40, 40, 60)}, ["coeff_mod_bit_sizes", "280", "218"]),
        ({"coeff_mod_bit_sizes": (60, 60)}, ["coeff_mod_bit_sizes", "at least 3"]),
        ({"coeff_mod_bit_sizes": (60, 30, 40, 60)}, ["coeff_mod_bit_sizes", "global_scale_bits=40"]),
        ({"coeff_mod_bit_sizes": (40, 40, 40, 60)}, ["first prime"]),
        ({"coeff_mod_bit_sizes": (60, 40, 40, 50)}, ["special"]),
        ({"coeff_mod_bit_sizes": (70, 40, 40, 60)}, ["coeff_mod_bit_sizes", "70"]),
        ({"global_scale_bits": 10}, ["global_scale_bits", "10"]),
        ({"poly_modulus_degree": 8192, "nonsense": 1}, ["nonsense"]),
    ],
)
def test_bad_params_name_the_field_and_value(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        CkksParams(**kwargs)
    text = str(info.value)
    for needle in needles:
        assert needle in text


def test_params_are_frozen() -> None:
    with pytest.raises(ValidationError):
        CkksParams().poly_modulus_degree = 16384  # type: ignore[misc]


def test_small_ring_params_are_accepted() -> None:
    p = CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 20, 40), global_scale_bits=20)
    assert p.slots == 2048


# -- precision ------------------------------------------------------------------------------------
def test_sum_and_mean_of_ten_vectors_within_documented_tolerance(key_ctx: KeyHolderContext, public_ctx: PublicContext) -> None:
    rng = np.random.default_rng(0)
    xs = rng.uniform(-10, 10, size=(10, SLOTS + 100))
    x = xs[0]
    encs = [EncryptedVector.from_wire(public_ctx, key_ctx.encrypt(x).to_wire(), x.size, x.shape) for x in xs]
    total = public_ctx.add(*encs)
    err_sum = np.abs(key_ctx.decrypt(EncryptedVector.from_wire(key_ctx, total.to_wire(), x.size, x.shape)) - xs.sum(0))
    assert err_sum.max() < SUM_TOL
    mean = public_ctx.multiply(total, 0.1)
    err_mean = np.abs(key_ctx.decrypt(EncryptedVector.from_wire(key_ctx, mean.to_wire(), x.size, x.shape)) - xs.mean(0))
    assert err_mean.max() < MEAN_TOL
    # And CKKS is really approximate: the result is not bit-exact (guards against a no-op "encryption").
    assert err_sum.max() > 0


# -- packing --------------------------------------------------------------------------------------
def test_dense_packing_uses_ceil_length_over_half_n_chunks(key_ctx: KeyHolderContext) -> None:
    x = np.arange(2 * SLOTS + 5, dtype=np.float64).reshape(-1, 1) / 1000
    enc = key_ctx.encrypt(x)
    assert len(enc.chunks) == 3
    assert [c.size() for c in enc.chunks] == [SLOTS, SLOTS, 5]
    assert enc.shape == x.shape
    out = key_ctx.decrypt(enc)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_encrypt_rejects_non_finite_and_out_of_range(key_ctx: KeyHolderContext) -> None:
    with pytest.raises(ValueError, match=r"non-finite value nan at flat index 2"):
        key_ctx.encrypt([0.0, 1.0, float("nan")])
    with pytest.raises(ValueError, match=r"value 1000000.0 at flat index 1 exceeds the CKKS range \|x\| < 524288"):
        key_ctx.encrypt([0.0, 1e6])
    with pytest.raises(ValueError, match="empty"):
        key_ctx.encrypt([])


# -- who can decrypt ------------------------------------------------------------------------------
def test_public_context_holds_no_secret_and_cannot_decrypt(key_ctx: KeyHolderContext, public_ctx: PublicContext) -> None:
    assert key_ctx.holds_secret_key and key_ctx.tenseal_context.is_private()
    assert not public_ctx.holds_secret_key
    assert public_ctx.tenseal_context.is_public() and not public_ctx.tenseal_context.has_secret_key()
    # make_context_public() on a copy must not strip the key holder's own key.
    assert key_ctx.public().tenseal_context is not key_ctx.tenseal_context
    enc = EncryptedVector.from_wire(public_ctx, key_ctx.encrypt([1.0, 2.0]).to_wire(), 2, (2,))
    with pytest.raises(SecretKeyRequired, match="cannot decrypt"):
        public_ctx.decrypt(enc)
    sealed = key_ctx.seal(torch.ones(2))
    with pytest.raises(SecretKeyRequired):
        public_ctx.open(sealed)


def test_tenseal_itself_cannot_decrypt_a_vector_linked_to_the_public_context(
    key_ctx: KeyHolderContext, public_ctx: PublicContext
) -> None:
    blob = key_ctx.encrypt([1.0, 2.0, 3.0]).to_wire()[0]
    body = blob[45:]  # strip the securefl header: plain TenSEAL bytes
    vec = ts.ckks_vector_from(public_ctx.tenseal_context, body)
    with pytest.raises(ValueError, match="secret_key"):
        vec.decrypt()
    # The same bytes decrypt fine with the key holder's context: the failure above is the missing key.
    np.testing.assert_allclose(ts.ckks_vector_from(key_ctx.tenseal_context, body).decrypt(), [1, 2, 3], atol=1e-6)


def test_public_context_bytes_carry_no_secret_and_refuse_secret_bytes(key_ctx: KeyHolderContext) -> None:
    data = key_ctx.public().to_bytes()
    loaded = PublicContext.from_bytes(data)
    assert not loaded.tenseal_context.is_private()
    assert loaded.fingerprint == key_ctx.fingerprint
    with pytest.raises(ValueError, match="bad header"):
        PublicContext.from_bytes(key_ctx.export_secret_for_committee())
    with pytest.raises(ValueError):
        PublicContext(key_ctx.tenseal_context, key_ctx.params)


# -- the key holder stays off the wire ----------------------------------------------------------
def test_key_holder_refuses_pickle_copy_and_wire(key_ctx: KeyHolderContext, make_msg) -> None:
    with pytest.raises(TypeError, match="secret key"):
        pickle.dumps(key_ctx)
    with pytest.raises(TypeError):
        key_ctx.__getstate__()
    with pytest.raises(TypeError):
        key_ctx.__reduce__()
    with pytest.raises(TypeError):
        copy.deepcopy(key_ctx)
    with pytest.raises(TypeError, match="KeyHolderContext holds a CKKS secret key"):
        assert_wire_safe(key_ctx)
    with pytest.raises(TypeError, match=r"meta\['ctx'\]"):
        assert_wire_safe(make_msg(meta={"ctx": key_ctx}))
    # A ciphertext object still linked to the private context holds the key too.
    with pytest.raises(TypeError):
        assert_wire_safe(key_ctx.encrypt([1.0]))
    with pytest.raises(TypeError, match="TenSEAL context that holds the secret key"):
        assert_wire_safe(key_ctx.tenseal_context)


def test_public_things_are_wire_safe(key_ctx: KeyHolderContext, public_ctx: PublicContext, make_msg) -> None:
    assert_wire_safe(public_ctx)
    sealed = key_ctx.seal(torch.ones(3))
    msg = sealed.attach(make_msg(), "logits")
    assert assert_wire_safe(msg) is msg
    with pytest.raises(TypeError, match="to_bytes"):
        pickle.dumps(public_ctx)


def test_committee_shares_one_key(key_ctx: KeyHolderContext) -> None:
    member = KeyHolderContext.from_committee_secret(key_ctx.export_secret_for_committee())
    assert member.fingerprint == key_ctx.fingerprint
    sealed = key_ctx.seal(torch.tensor([1.5, -2.5]))
    torch.testing.assert_close(member.open(sealed), torch.tensor([1.5, -2.5]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="bad header"):
        KeyHolderContext.from_committee_secret(key_ctx.public().to_bytes())


def test_a_different_key_is_named_in_the_error(key_ctx: KeyHolderContext) -> None:
    stranger = KeyHolderContext.generate()
    chunks = stranger.encrypt([1.0, 2.0]).to_wire()
    with pytest.raises(CiphertextError, match=r"chunk 0 of 1: encrypted under key .* this context's key"):
        EncryptedVector.from_wire(key_ctx, chunks, 2, (2,))


# -- wire validation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_chunks(key_ctx: KeyHolderContext) -> tuple[list[bytes], int]:
    length = 2 * SLOTS + 7
    return key_ctx.encrypt(np.linspace(-1, 1, length)).to_wire(), length


def test_valid_chunks_load(public_ctx: PublicContext, three_chunks) -> None:
    chunks, length = three_chunks
    enc = EncryptedVector.from_wire(public_ctx, chunks, length, (length,))
    assert len(enc.chunks) == 3


@pytest.mark.parametrize("position", [100, 5_000, -1])
def test_tampered_ciphertext_bytes_are_rejected(public_ctx: PublicContext, three_chunks, position: int) -> None:
    chunks, length = three_chunks
    bad = bytearray(chunks[1])
    bad[position] ^= 0x01
    with pytest.raises(CiphertextError, match="chunk 1 of 3: digest mismatch"):
        EncryptedVector.from_wire(public_ctx, [chunks[0], bytes(bad), chunks[2]], length, (length,))


def test_truncated_chunk_is_rejected(public_ctx: PublicContext, three_chunks) -> None:
    chunks, length = three_chunks
    with pytest.raises(CiphertextError, match="chunk 2 of 3: digest mismatch"):
        EncryptedVector.from_wire(public_ctx, [chunks[0], chunks[1], chunks[2][:-10]], length, (length,))
    with pytest.raises(CiphertextError, match="chunk 2 of 3: only 20 bytes"):
        EncryptedVector.from_wire(public_ctx, [chunks[0], chunks[1], chunks[2][:20]], length, (length,))


def test_wrong_chunk_count_is_rejected(public_ctx: PublicContext, three_chunks) -> None:
    chunks, length = three_chunks
    with pytest.raises(CiphertextError, match=r"got 2 chunks for length 8199; expected 3"):
        EncryptedVector.from_wire(public_ctx, chunks[:2], length, (length,))
    with pytest.raises(CiphertextError, match=r"got 4 chunks"):
        EncryptedVector.from_wire(public_ctx, [*chunks, chunks[0]], length, (length,))


def test_wrong_length_is_rejected(public_ctx: PublicContext, three_chunks) -> None:
    chunks, length = three_chunks
    with pytest.raises(CiphertextError, match=r"chunk 0 of 3: belongs to a vector of length 8199, not 8198"):
        EncryptedVector.from_wire(public_ctx, chunks, length - 1, (length - 1,))
    with pytest.raises(CiphertextError, match="shape"):
        EncryptedVector.from_wire(public_ctx, chunks, length, (length, 2))


def test_reordered_chunks_are_rejected(public_ctx: PublicContext, three_chunks) -> None:
    chunks, length = three_chunks
    with pytest.raises(CiphertextError, match="chunk 0 of 3: labelled as chunk 1 of 3"):
        EncryptedVector.from_wire(public_ctx, [chunks[1], chunks[0], chunks[2]], length, (length,))


def test_garbage_and_wrong_types_are_rejected(public_ctx: PublicContext) -> None:
    with pytest.raises(CiphertextError, match="chunk 0 of 1: not a securefl CKKS chunk"):
        EncryptedVector.from_wire(public_ctx, [b"x" * 100], 5, (5,))
    with pytest.raises(CiphertextError, match="chunk 0 of 1: expected bytes, got str"):
        EncryptedVector.from_wire(public_ctx, ["abc"], 5, (5,))  # type: ignore[list-item]
    with pytest.raises(CiphertextError, match="single bytes object"):
        EncryptedVector.from_wire(public_ctx, b"abc", 5, (5,))  # type: ignore[arg-type]


def _rewrap(body: bytes, *, index: int, count: int, length: int, fingerprint: bytes) -> bytes:
    """Build a chunk with a *valid* securefl header and digest around an arbitrary body."""
    header = struct.Struct("<4sBIIQ8s16s")
    prefix = header.pack(b"SFCK", 1, index, count, length, fingerprint, b"")[: header.size - 16]
    return prefix + hashlib.sha256(prefix + body).digest()[:16] + body


def test_undeserializable_body_behind_a_valid_header_is_rejected(public_ctx: PublicContext) -> None:
    chunk = _rewrap(b"\x00" * 64, index=0, count=1, length=5, fingerprint=public_ctx.fingerprint)
    with pytest.raises(CiphertextError, match="chunk 0 of 1: TenSEAL could not deserialize it"):
        EncryptedVector.from_wire(public_ctx, [chunk], 5, (5,))


def test_wrong_slot_count_behind_a_valid_header_is_rejected(key_ctx: KeyHolderContext, public_ctx: PublicContext) -> None:
    body = key_ctx.encrypt(np.ones(10)).to_wire()[0][45:]
    chunk = _rewrap(body, index=0, count=1, length=20, fingerprint=public_ctx.fingerprint)
    with pytest.raises(CiphertextError, match="chunk 0 of 1: holds 10 slots, expected 20"):
        EncryptedVector.from_wire(public_ctx, [chunk], 20, (20,))


# -- homomorphic operations on the public side ----------------------------------------------------
def test_public_context_multiplies_by_plaintext_vector(key_ctx: KeyHolderContext, public_ctx: PublicContext) -> None:
    x = np.linspace(-3, 3, SLOTS + 3)
    factor = np.linspace(0, 2, SLOTS + 3)
    enc = EncryptedVector.from_wire(public_ctx, key_ctx.encrypt(x).to_wire(), x.size, x.shape)
    out = public_ctx.multiply(enc, torch.from_numpy(factor))
    got = key_ctx.decrypt(EncryptedVector.from_wire(key_ctx, out.to_wire(), x.size, x.shape))
    np.testing.assert_allclose(got, x * factor, atol=MEAN_TOL)
    with pytest.raises(ValueError, match="3 values"):
        public_ctx.multiply(enc, np.ones(3))


# -- the aggregator -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replies(key_ctx: KeyHolderContext):
    from securefl.core.message import Message

    gen = torch.Generator().manual_seed(1)
    xs = [torch.empty(4, 30).uniform_(-10, 10, generator=gen) for _ in range(5)]
    msgs = [
        seal_tensor(key_ctx, x).attach(
            Message(sender=f"p{i}", receiver="aggregator", run_id="run-1", round=2, kind="logits"), "logits"
        )
        for i, x in enumerate(xs)
    ]
    return xs, msgs


def test_aggregator_sum_mean_weighted_mean(key_ctx: KeyHolderContext, public_ctx: PublicContext, replies) -> None:
    xs, msgs = replies
    agg = CkksAggregator(public_ctx)
    stacked = torch.stack(xs).double()
    total = agg.sum(msgs, "logits")
    assert isinstance(total, SealedTensor) and total.scheme == "ckks" and total.shape == (4, 30)
    # The sum opens as float32 (the payload dtype): |sum| <= 50 rounds to within 2e-6 on top of CKKS' error.
    torch.testing.assert_close(key_ctx.open(total).double(), stacked.sum(0), atol=SUM_TOL + 2e-6, rtol=0)
    mean = key_ctx.open(agg.mean(msgs, "logits"))
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), stacked.mean(0), atol=MEAN_TOL, rtol=0)
    weights = [1.0, 2.0, 0.0, 3.0, 4.0]
    expected = sum(w * x for w, x in zip(weights, stacked, strict=True)) / sum(weights)
    for given in (weights, {f"p{i}": w for i, w in enumerate(weights)}):
        got = key_ctx.open(agg.weighted_mean(msgs, "logits", given)).double()
        torch.testing.assert_close(got, expected, atol=MEAN_TOL, rtol=0)


def test_protocol_forwards_the_sealed_result_and_participants_open_it(
    key_ctx: KeyHolderContext, public_ctx: PublicContext, replies, make_msg
) -> None:
    xs, msgs = replies
    consensus = CkksAggregator(public_ctx).mean(msgs, "logits")
    down = attach(make_msg("aggregator", receiver="*", kind="consensus"), "consensus", consensus)
    assert is_sealed(down, "consensus")
    assert isinstance(down.payload["consensus"], list) and down.meta["sealed.consensus"]["shape"] == [4, 30]
    assert SealedTensor.from_message(down, "consensus") == consensus
    z = open_field(down, "consensus", key_ctx)
    torch.testing.assert_close(z.double(), torch.stack(xs).double().mean(0), atol=MEAN_TOL, rtol=0)
    with pytest.raises(ValueError, match="key holder is needed"):
        open_field(down, "consensus")
    with pytest.raises(SecretKeyRequired):
        open_field(down, "consensus", public_ctx)


def test_outbound_seal_field_replaces_the_plaintext(key_ctx: KeyHolderContext, make_msg) -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    plain = make_msg(payload={"logits": x, "other": torch.ones(1)})
    sealed_msg = seal_field(plain, "logits", key_ctx)
    assert isinstance(sealed_msg.payload["logits"], list)
    assert all(isinstance(c, bytes) for c in sealed_msg.payload["logits"])
    assert x.numpy().tobytes() not in b"".join(sealed_msg.payload["logits"])
    assert torch.equal(sealed_msg.payload["other"], torch.ones(1))
    torch.testing.assert_close(key_ctx.open(SealedTensor.from_message(sealed_msg, "logits")), x, atol=1e-5, rtol=0)


def test_aggregator_rejects_bad_inputs(key_ctx: KeyHolderContext, public_ctx: PublicContext, replies, make_msg) -> None:
    xs, msgs = replies
    with pytest.raises(TypeError, match="PublicContext"):
        CkksAggregator(key_ctx)  # type: ignore[arg-type]
    agg = CkksAggregator(public_ctx)
    with pytest.raises(ValueError, match=r"several replies from \['p0'\]"):
        agg.sum([msgs[0], msgs[0]], "logits")
    odd = seal_tensor(key_ctx, torch.ones(3)).attach(make_msg("p9"), "logits")
    with pytest.raises(ValueError, match="field 'logits' has different shapes across replies"):
        agg.sum([msgs[0], odd], "logits")
    chunks = list(msgs[1].payload["logits"])
    chunks[0] = chunks[0][:-1] + bytes([chunks[0][-1] ^ 1])
    tampered = msgs[1].with_payload(logits=chunks)
    with pytest.raises(CiphertextError, match=r"reply from 'p1', field 'logits': chunk 0 of 1: digest mismatch"):
        agg.mean([msgs[0], tampered], "logits")
    with pytest.raises(KeyError, match="no sealed field 'missing'"):
        agg.sum(msgs, "missing")
    with pytest.raises(ValueError, match="weight of 'p0' must be finite and >= 0"):
        agg.weighted_mean(msgs, "logits", [-1.0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="no weight for senders"):
        agg.weighted_mean(msgs, "logits", {"p0": 1.0})
    with pytest.raises(ValueError, match="no replies"):
        agg.sum([], "logits")


def test_scale_sum_by_public_counts(key_ctx: KeyHolderContext, public_ctx: PublicContext, replies) -> None:
    xs, msgs = replies
    agg = CkksAggregator(public_ctx)
    counts = torch.arange(1, 121, dtype=torch.float64).reshape(4, 30)
    out = key_ctx.open(agg.scale(agg.sum(msgs, "logits"), 1.0 / counts)).double()
    torch.testing.assert_close(out, torch.stack(xs).double().sum(0) / counts, atol=MEAN_TOL, rtol=0)


def test_integer_tensors_round_trip(key_ctx: KeyHolderContext) -> None:
    counts = torch.tensor([0, 3, 17, 250], dtype=torch.int64)
    assert torch.equal(key_ctx.open(key_ctx.seal(counts)), counts)


def test_inbound_layer_opens_every_sealed_field(key_ctx: KeyHolderContext, make_msg) -> None:
    from securefl.core.sealed import open_sealed_fields

    a, b = torch.ones(3), torch.arange(4, dtype=torch.float32)
    msg = key_ctx.seal(b).attach(key_ctx.seal(a).attach(make_msg(payload={"plain": torch.zeros(1)}), "a"), "b")
    opened = open_sealed_fields(msg, key_ctx)
    assert not any(k.startswith("sealed.") for k in opened.meta)
    torch.testing.assert_close(opened.tensor("a"), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(opened.tensor("b"), b, atol=1e-5, rtol=0)
    assert torch.equal(opened.tensor("plain"), torch.zeros(1))
    plain = make_msg(payload={"x": torch.ones(1)})
    assert open_sealed_fields(plain, key_ctx) is plain


# -- seal: the chunks encrypted on TenSEAL's thread pool -------------------------------------------
@pytest.fixture(scope="module")
def one_thread(key_ctx: KeyHolderContext) -> KeyHolderContext:
    """The same key, encrypting one chunk after another."""
    return KeyHolderContext.from_committee_secret(key_ctx.export_secret_for_committee(), threads=1)


@pytest.mark.parametrize("length", [1, SLOTS, SLOTS + 1, 2 * SLOTS, 3 * SLOTS + 5])
def test_sealed_chunks_are_the_ckks_vectors_tenseal_writes(key_ctx: KeyHolderContext, one_thread: KeyHolderContext,
                                                           length: int) -> None:
    """Batched or not, every chunk's body is exactly what TenSEAL serializes for that CKKSVector."""
    pooled = KeyHolderContext.from_committee_secret(key_ctx.export_secret_for_committee(), threads=2)
    x = torch.linspace(-9, 9, length)
    for ctx in (pooled, one_thread):
        sealed = ctx.seal(x)
        assert len(sealed.chunks) == ctx.params.n_chunks(length)
        for i, chunk in enumerate(sealed.chunks):
            body = chunk[45:]
            vec = ts.ckks_vector_from(ctx.tenseal_context, body)
            assert vec.serialize() == body
            assert vec.size() == min(SLOTS, length - i * SLOTS)
        # Opened by the other context of the same key: the wire format does not depend on the path.
        other = one_thread if ctx is pooled else pooled
        torch.testing.assert_close(other.open(sealed), x, atol=SUM_TOL, rtol=0)


def test_a_short_last_chunk_is_encoded_like_tenseal_encodes_it(key_ctx: KeyHolderContext,
                                                              public_ctx: PublicContext) -> None:
    """CKKSVector repeats a short chunk over all slots; so does the batched path, so element-wise
    products with a plaintext vector and sums with chunks encrypted either way stay correct."""
    pooled = KeyHolderContext.from_committee_secret(key_ctx.export_secret_for_committee(), threads=2)
    x = np.linspace(-3, 3, 2 * SLOTS + 11)
    factor = np.linspace(0.5, 2, x.size)
    sealed = pooled.seal(torch.from_numpy(x))
    enc = EncryptedVector.from_wire(public_ctx, sealed.chunks, x.size, x.shape)
    total = enc + key_ctx.encrypt(x)
    got = key_ctx.decrypt(EncryptedVector.from_wire(key_ctx, (total * factor).to_wire(), x.size, x.shape))
    np.testing.assert_allclose(got, 2 * x * factor, atol=MEAN_TOL)


def test_seal_with_a_pool_encrypts_no_chunk_on_its_own(key_ctx: KeyHolderContext, monkeypatch) -> None:
    pooled = KeyHolderContext.from_committee_secret(key_ctx.export_secret_for_committee(), threads=2)

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("encrypted chunk by chunk")

    monkeypatch.setattr(ts, "ckks_vector", refuse)
    x = torch.linspace(-1, 1, 3 * SLOTS)
    torch.testing.assert_close(pooled.open(pooled.seal(x)), x, atol=SUM_TOL, rtol=0)


def test_an_unexpected_tenseal_message_falls_back_to_chunk_by_chunk(key_ctx: KeyHolderContext, monkeypatch) -> None:
    from securefl.crypto.ckks import context

    pooled = KeyHolderContext.from_committee_secret(key_ctx.export_secret_for_committee(), threads=2)
    x = torch.linspace(-1, 1, 2 * SLOTS + 1)
    monkeypatch.setattr(context, "_proto_fields", lambda blob: iter([(2, 0, 10)]))  # one ciphertext, no scale
    torch.testing.assert_close(pooled.open(pooled.seal(x)), x, atol=SUM_TOL, rtol=0)

    def truncated(blob):  # type: ignore[no-untyped-def]
        raise ValueError("truncated")

    monkeypatch.setattr(context, "_proto_fields", truncated)
    torch.testing.assert_close(pooled.open(pooled.seal(x)), x, atol=SUM_TOL, rtol=0)


def test_protobuf_reader_refuses_truncated_messages() -> None:
    from securefl.crypto.ckks.wire import _proto_fields, _varint

    good = b"\x0a\x02" + _varint(4096) + b"\x12\x03abc" + b"\x19" + struct.pack("<d", 2.0**40)
    assert [(n, good[s:e]) for n, s, e in _proto_fields(good)] == [
        (1, _varint(4096)), (2, b"abc"), (3, struct.pack("<d", 2.0**40))]
    for bad in (good[:-1], good[:5], b"\x12\x05abc", b"\x12\xff", b"\x0b"):
        with pytest.raises(ValueError):
            list(_proto_fields(bad))
