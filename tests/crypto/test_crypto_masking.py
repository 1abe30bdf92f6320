"""Pairwise masking (SecAgg): exact sums, dropout recovery, aborts, and real ChaCha20 masks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefl.core.message import AGGREGATOR, Message
from securefl.core.sealed import SealedTensor
from securefl.crypto import assert_wire_safe
from securefl.crypto.errors import SecAggAbort
from securefl.crypto.fixedpoint import FixedPoint
from securefl.crypto.masking import KIND_UNMASK_REQUEST, ClientSecrets, MaskingSession, _lp
from securefl.layers.masking_aggregator import MaskingAggregator, SecAggSimulation

IDS10 = [f"p{i:02d}" for i in range(10)]


def reply(pid: str, sealed: SealedTensor, *, field: str = "update", round: int = 1) -> Message:
    msg = Message(sender=pid, receiver=AGGREGATOR, run_id="run-1", round=round, kind="update")
    return sealed.attach(msg, field)


def run(sim: SecAggSimulation, inputs: dict[str, torch.Tensor], *, senders=None, field: str = "update"):
    senders = list(inputs) if senders is None else senders
    return [reply(pid, sim.clients[pid].mask_input(inputs[pid], field=field), field=field) for pid in senders]


def representable(shape, *, seed: int, frac_bits: int = 24) -> torch.Tensor:
    # Multiples of 2^-10 are exactly representable with 24 fractional bits and in float64.
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-50_000, 50_000, shape, generator=gen).double() / 2**10


def fixed_secrets(ids, salt: int = 0) -> dict[str, ClientSecrets]:
    out = {}
    for k, pid in enumerate(ids):
        base = bytes([k + 1, salt]) * 16
        out[pid] = ClientSecrets(channel_key=base, mask_key=bytes(reversed(base)), self_mask_seed=base[::-1][:16] * 2)
    return out


# -- correctness ----------------------------------------------------------------------------------
def test_masked_sum_equals_plaintext_sum_exactly() -> None:
    ids = [f"p{i}" for i in range(5)]
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=ids, threshold=3))
    xs = {pid: representable((3, 7), seed=i) for i, pid in enumerate(ids)}
    replies = run(sim, xs)
    # The masked replies themselves do not reveal the inputs.
    masked = np.frombuffer(replies[0].payload["update"][0], dtype="<u8")
    encoded = sim.session.encoding.encode(xs["p0"], n_contributors=5)
    assert np.count_nonzero(masked == encoded) == 0
    total = sim.aggregator.sum(replies, "update")
    assert total.dtype == torch.float64 and total.shape == (3, 7)
    assert torch.equal(total, sum(xs.values()))


def test_general_inputs_within_resolution_and_mean() -> None:
    ids = [f"p{i}" for i in range(4)]
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=ids, threshold=3))
    gen = torch.Generator().manual_seed(0)
    xs = {pid: torch.randn(1000, generator=gen) for pid in ids}  # float32
    replies = run(sim, xs)
    mean = sim.aggregator.mean(replies, "update")
    assert mean.dtype == torch.float32
    exact = sum(x.double() for x in xs.values()) / 4
    assert (mean.double() - exact).abs().max() <= 2**-24 + 1e-7  # fixed-point + float32 rounding
    total = sim.aggregator.sum(replies, "update")
    assert (total.double() - exact * 4).abs().max() <= 4 * 2**-25 + 1e-6


def test_two_of_ten_dropping_after_sharing_keys_are_recovered_exactly() -> None:
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=IDS10, threshold=6))
    assert sim.aggregator.mask_peers == tuple(IDS10)
    xs = {pid: representable((500,), seed=i) for i, pid in enumerate(IDS10)}
    survivors = [pid for pid in IDS10 if pid not in ("p03", "p07")]
    sim.drop("p03", "p07")  # they shared keys, but send no masked input
    total = sim.aggregator.sum(run(sim, xs, senders=survivors), "update")
    assert torch.equal(total, sum(xs[pid] for pid in survivors))
    # The survivors alone, without unmasking the dropped pairs, would be garbage: the recovery did real work.
    assert len(sim.aggregator._unmasked.dropped_pair_seeds) == 2 * len(survivors)


def test_dropouts_before_sharing_keys_are_left_out_of_the_masks() -> None:
    session = MaskingSession(run_id="run-1", round=1, participant_ids=IDS10, threshold=6)
    sim = SecAggSimulation.setup(session, drop_before_advertise=["p00"], drop_before_share_keys=["p05", "p09"])
    assert set(sim.clients) == set(IDS10) - {"p00", "p05", "p09"}
    xs = {pid: representable((64,), seed=i) for i, pid in enumerate(sim.clients)}
    senders = [pid for pid in sim.clients if pid != "p01"]  # and one more drops after sharing
    sim.drop("p01")
    assert torch.equal(sim.aggregator.sum(run(sim, xs, senders=senders), "update"), sum(xs[p] for p in senders))


def test_weighted_mean_needs_client_side_weights() -> None:
    ids = [f"p{i}" for i in range(3)]
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=ids, threshold=2))
    xs = {pid: representable((10,), seed=i) for i, pid in enumerate(ids)}
    weights = {"p0": 1.0, "p1": 2.0, "p2": 5.0}
    replies = [reply(pid, sim.clients[pid].mask_input(xs[pid], field="update", weight=weights[pid])) for pid in ids]
    plain = run(sim, xs, field="plain")
    got = sim.aggregator.weighted_mean(replies, "update", weights)
    expected = sum(weights[p] * xs[p] for p in ids) / 8.0
    assert (got - expected).abs().max() <= 2**-24
    with pytest.raises(ValueError, match="masked with weight 2.0"):
        sim.aggregator.weighted_mean(replies, "update", {"p0": 1.0, "p1": 3.0, "p2": 5.0})
    with pytest.raises(ValueError, match="pre-weighted; use weighted_mean"):
        sim.aggregator.mean(replies, "update")
    with pytest.raises(ValueError, match="not pre-weighted"):
        sim.aggregator.weighted_mean(plain, "plain", [1, 1, 1])


# -- aborts ---------------------------------------------------------------------------------------
def test_fewer_than_t_masked_inputs_abort_without_a_result() -> None:
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=4, participant_ids=IDS10, threshold=6))
    xs = {pid: representable((8,), seed=i) for i, pid in enumerate(IDS10)}
    replies = run(sim, xs, senders=IDS10[:5])
    with pytest.raises(SecAggAbort, match=r"round 4 of run 'run-1'.*only 5 participants sent masked inputs.*t=6") as info:
        sim.aggregator.mean(replies, "update")
    assert "no partial result" in str(info.value)
    assert sim.aggregator._unmasked is None  # nothing was reconstructed or revealed
    assert all(c._answered is None for c in sim.clients.values())  # no client revealed a share


def test_survivors_going_silent_during_unmasking_abort() -> None:
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=IDS10, threshold=6))
    xs = {pid: representable((8,), seed=i) for i, pid in enumerate(IDS10)}
    senders = IDS10[:7]
    replies = run(sim, xs, senders=senders)
    sim.drop(*IDS10[7:], "p00", "p01")  # only 5 of the 7 senders answer the unmasking request
    with pytest.raises(SecAggAbort, match="only 5 survivors answered the unmasking request"):
        sim.aggregator.sum(replies, "update")


def test_too_few_at_setup_abort() -> None:
    session = MaskingSession(run_id="run-1", round=1, participant_ids=IDS10, threshold=6)
    with pytest.raises(SecAggAbort, match="ShareKeys: only 5 participants shared their keys"):
        SecAggSimulation.setup(session, drop_before_share_keys=IDS10[:5])
    with pytest.raises(SecAggAbort, match="AdvertiseKeys: only 4 participants advertised keys"):
        SecAggSimulation.setup(session, drop_before_advertise=IDS10[:6])


def test_threshold_must_be_a_majority() -> None:
    with pytest.raises(ValueError, match="n/2 < t <= n .* n=10 participants, got 5"):
        MaskingSession(run_id="r", round=0, participant_ids=IDS10, threshold=5)
    with pytest.raises(ValueError, match="got 11"):
        MaskingSession(run_id="r", round=0, participant_ids=IDS10, threshold=11)
    with pytest.raises(ValueError, match="duplicates"):
        MaskingSession(run_id="r", round=0, participant_ids=["a", "a", "b"], threshold=2)


def test_survivor_set_cannot_change_within_a_session() -> None:
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=IDS10, threshold=6))
    xs = {pid: representable((8,), seed=i) for i, pid in enumerate(IDS10)}
    # A reply message can carry several masked fields; all are masked before unmasking starts.
    a, b, c = (run(sim, xs, senders=IDS10[:9], field=f) for f in "abc")
    sim.aggregator.sum(a[:8], "a")
    with pytest.raises(SecAggAbort, match="survivor set cannot change"):
        sim.aggregator.sum(b, "b")  # p08 was treated as dropped for field "a"
    # Same survivors, another field: fine (independent masks per field).
    assert torch.equal(sim.aggregator.sum(c[:8], "c"), sum(xs[p] for p in IDS10[:8]))


def test_a_client_never_answers_two_different_unmask_requests() -> None:
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=IDS10, threshold=6))
    client = sim.clients["p00"]

    def request(survivors):
        dropped = [p for p in IDS10 if p not in survivors]
        return Message(
            sender=AGGREGATOR,
            receiver="p00",
            run_id="run-1",
            round=1,
            kind=KIND_UNMASK_REQUEST,
            payload={"survivors": [s.encode() for s in survivors], "dropped": [d.encode() for d in dropped]},
        )

    first = client.unmask(request(IDS10[:8]))
    assert sorted(o.decode() for o in first.payload["s_owners"]) == ["p08", "p09"]
    client.unmask(request(IDS10[:8]))  # the same request again is harmless
    with pytest.raises(SecAggAbort, match="refusing a second answer"):
        client.unmask(request(IDS10[:7]))  # would reveal p07's mask key after its self-mask seed
    with pytest.raises(SecAggAbort, match="unmasking has started"):
        client.mask_input(torch.zeros(2), field="late")


def test_tampered_share_ciphertext_is_rejected() -> None:
    session = MaskingSession(run_id="run-1", round=1, participant_ids=["a", "b", "c"], threshold=2)
    from securefl.crypto.masking import MaskingClient

    clients = {pid: MaskingClient(session, pid) for pid in session.participant_ids}
    server = MaskingAggregator(session)
    roster = server.collect_advertisements([c.advertise_keys() for c in clients.values()])
    inboxes = server.route_shares([c.share_keys(roster) for c in clients.values()])
    blobs = list(inboxes["b"].payload["ciphertexts"])
    blobs[0] = blobs[0][:-1] + bytes([blobs[0][-1] ^ 1])
    with pytest.raises(ValueError, match="'b': the share from 'a' failed to decrypt"):
        clients["b"].receive_shares(inboxes["b"].with_payload(ciphertexts=blobs))


def test_a_field_is_masked_once_and_overflow_is_reported() -> None:
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=["a", "b", "c"], threshold=2))
    sim.clients["a"].mask_input(torch.zeros(3), field="x")
    with pytest.raises(ValueError, match="already masked"):
        sim.clients["a"].mask_input(torch.zeros(3), field="x")
    with pytest.raises(ValueError, match=r"value 999999995904.0 at flat index 0 exceeds the fixed-point bound .* 3 contributors"):
        sim.clients["a"].mask_input(torch.tensor([1e12]), field="y")  # float32
    with pytest.raises(ValueError, match="non-finite"):
        sim.clients["a"].mask_input(torch.tensor([float("inf")]), field="z")


# -- the masks are real ChaCha20 streams ------------------------------------------------------------
def _hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"securefl/secagg/v1" + info).derive(ikm)


def _chacha(seed: bytes, field: str, n: int) -> np.ndarray:
    key = _hkdf(seed, _lp("prg", field))
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(b"\0" * (8 * n))
    return np.frombuffer(stream, dtype="<u8")


def test_masks_are_the_documented_chacha20_streams() -> None:
    """Recompute p00's masked vector from its secrets with `cryptography` directly."""
    ids = ["p00", "p01", "p02"]
    secrets_ = fixed_secrets(ids)
    session = MaskingSession(run_id="run-1", round=3, participant_ids=ids, threshold=2)
    sim = SecAggSimulation.setup(session, client_secrets=secrets_)
    x = representable((50,), seed=0)
    y = np.frombuffer(sim.clients["p00"].mask_input(x, field="logits").chunks[0], dtype="<u8")
    expected = session.encoding.encode(x, n_contributors=3)
    self_key = _hkdf(secrets_["p00"].self_mask_seed, _lp("self-mask", "run-1", 3, "p00"))
    expected = expected + _chacha(self_key, "logits", 50)
    for peer in ("p01", "p02"):  # p00 < peer: pairwise masks are added
        shared = secrets_["p00"].mask_key.exchange(secrets_[peer].mask_key.public_key())
        expected = expected + _chacha(_hkdf(shared, _lp("pair-mask", "run-1", 3, "p00", peer)), "logits", 50)
    assert np.array_equal(y, expected)


def test_a_masked_vector_looks_uniform() -> None:
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=["a", "b", "c"], threshold=2))
    n = 20_000
    y = np.frombuffer(sim.clients["b"].mask_input(torch.zeros(n), field="x").chunks[0], dtype="<u8")
    assert np.count_nonzero(y) == n  # zeros in, nothing zero out
    bits = np.unpackbits(y.view(np.uint8)).reshape(n, 64)
    freq = bits.mean(axis=0)
    assert np.all(np.abs(freq - 0.5) < 0.02), freq  # 7 sigma at n = 20,000
    top_byte = (y >> np.uint64(56)).astype(np.int64)
    counts = np.bincount(top_byte, minlength=256)
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
    assert chi2 < 400  # 255 degrees of freedom; p < 1e-8 for uniform data to exceed this


def test_same_keys_same_masks_new_round_new_masks() -> None:
    ids = ["a", "b", "c"]
    x = torch.zeros(100)

    def masked(round_: int, salt: int = 0, field: str = "x") -> bytes:
        session = MaskingSession(run_id="run-1", round=round_, participant_ids=ids, threshold=2)
        sim = SecAggSimulation.setup(session, client_secrets=fixed_secrets(ids, salt))
        return sim.clients["a"].mask_input(x, field=field).chunks[0]

    assert masked(1) == masked(1)  # deterministic given the keys (Shamir randomness does not enter)
    assert masked(1) != masked(2)  # same keys, next round: different masks
    assert masked(1) != masked(1, salt=1)  # different keys: different masks
    assert masked(1, field="x") != masked(1, field="y")  # per-field streams


def test_client_secrets_are_single_use() -> None:
    secrets_ = fixed_secrets(["a", "b", "c"])
    SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=["a", "b", "c"], threshold=2),
                           client_secrets=secrets_)
    with pytest.raises(ValueError, match="single-use: already used by 'a' in run 'run-1' round 1"):
        SecAggSimulation.setup(MaskingSession(run_id="run-1", round=2, participant_ids=["a", "b", "c"], threshold=2),
                               client_secrets=secrets_)


def test_fresh_secrets_give_fresh_masks() -> None:
    session = MaskingSession(run_id="run-1", round=1, participant_ids=["a", "b", "c"], threshold=2)
    one = SecAggSimulation.setup(session).clients["a"].mask_input(torch.zeros(100), field="x").chunks[0]
    two = SecAggSimulation.setup(session).clients["a"].mask_input(torch.zeros(100), field="x").chunks[0]
    assert one != two


# -- wire safety --------------------------------------------------------------------------------------
def test_client_state_stays_off_the_wire() -> None:
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=["a", "b", "c"], threshold=2))
    with pytest.raises(TypeError, match="must never be pickled"):
        pickle.dumps(sim.clients["a"])
    with pytest.raises(TypeError, match="MaskingClient holds"):
        assert_wire_safe({"participant": sim.clients["a"]})
    with pytest.raises(TypeError, match="ClientSecrets holds"):
        assert_wire_safe([ClientSecrets.generate()])
    with pytest.raises(TypeError, match="X25519PrivateKey is a private key"):
        assert_wire_safe(X25519PrivateKey.generate())
    for msg in sim.traffic:
        assert_wire_safe(msg)
    assert_wire_safe(reply("a", sim.clients["a"].mask_input(torch.ones(2), field="update")))


def test_setup_messages_carry_no_plaintext_secrets() -> None:
    secrets_ = fixed_secrets(["a", "b", "c"])
    sim = SecAggSimulation.setup(MaskingSession(run_id="run-1", round=1, participant_ids=["a", "b", "c"], threshold=2),
                                 client_secrets=secrets_)
    from securefl.crypto.masking import _raw_private

    blob = b"".join(b"".join(v if isinstance(v, bytes) else b"".join(v) for v in m.payload.values()) for m in sim.traffic)
    for s in secrets_.values():
        assert s.self_mask_seed not in blob
        assert _raw_private(s.mask_key) not in blob


def test_custom_ring() -> None:
    session = MaskingSession(
        run_id="r", round=0, participant_ids=["a", "b", "c"], threshold=2, encoding=FixedPoint(ring_bits=32, fractional_bits=10)
    )
    sim = SecAggSimulation.setup(session)
    xs = {pid: torch.tensor([1.5, -2.25, 100.0]) * (i + 1) for i, pid in enumerate(["a", "b", "c"])}
    replies = run(sim, xs)
    assert len(replies[0].payload["update"][0]) == 3 * 4
    assert torch.equal(sim.aggregator.sum(replies, "update"), sum(xs.values()))
