"""Ed25519 message signing and the verifier's rejections."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from securefl.crypto import assert_wire_safe
from securefl.crypto.errors import RejectedMessage
from securefl.crypto.signing import (
    MessageVerifier,
    PartyKeys,
    canonical_bytes,
    generate_signing_key,
    public_key_bytes,
    sign_message,
)
from securefl.runtime.message import Message


@pytest.fixture
def keys() -> dict[str, PartyKeys]:
    return {pid: PartyKeys.generate(pid) for pid in ("alice", "bob")}


@pytest.fixture
def verifier(keys) -> MessageVerifier:
    return MessageVerifier("run-1", {pid: k.public_key for pid, k in keys.items()})


def msg(
    sender: str = "alice",
    *,
    round: int = 1,
    kind: str = "logits",
    run_id: str = "run-1",
    receiver: str = "aggregator",
    payload=None,
    meta=None,
) -> Message:
    payload = (
        payload
        if payload is not None
        else {
            "logits": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "blob": b"\x00\x01",
            "chunks": [b"ab", b"c"],
        }
    )
    return Message(
        sender=sender,
        receiver=receiver,
        run_id=run_id,
        round=round,
        kind=kind,
        payload=payload,
        meta=meta if meta is not None else {"sealed.x": {"length": 3, "shape": [3]}, "n": 5},
    )


def reason(verifier: MessageVerifier, m) -> str:
    with pytest.raises(RejectedMessage) as info:
        verifier.verify(m)
    return info.value.reason


def test_a_signed_message_verifies(keys, verifier) -> None:
    m = keys["alice"].sign(msg())
    assert isinstance(m.meta["signature"], str) and len(bytes.fromhex(m.meta["signature"])) == 64
    assert verifier.verify(m) is m
    assert verifier.verify(keys["bob"].sign(msg("bob"))).sender == "bob"


def test_replay_is_rejected(keys, verifier) -> None:
    m = keys["alice"].sign(msg(round=3))
    verifier.verify(m)
    assert reason(verifier, m) == "replay"
    # The same content re-signed is still a second message of that kind in that round.
    assert reason(verifier, sign_message(msg(round=3), keys["alice"].private_key)) == "replay"


def test_older_rounds_are_stale(keys, verifier) -> None:
    verifier.verify(keys["alice"].sign(msg(round=5)))
    assert reason(verifier, keys["alice"].sign(msg(round=4))) == "stale"
    verifier.verify(keys["alice"].sign(msg(round=6)))
    # Other kinds and other senders have their own clocks.
    verifier.verify(keys["alice"].sign(msg(round=2, kind="histogram")))
    verifier.verify(keys["bob"].sign(msg("bob", round=1)))


def test_forged_signature_is_rejected_and_does_not_block_the_real_message(keys, verifier) -> None:
    mallory = generate_signing_key()
    forged = sign_message(msg(round=7), mallory)  # claims to come from alice
    rejected = reason(verifier, forged)
    assert rejected == "bad signature"
    verifier.verify(keys["alice"].sign(msg(round=7)))  # not mistaken for a replay


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.with_payload(logits=m.payload["logits"] + 1e-6),
        lambda m: m.with_payload(logits=m.payload["logits"].double()),  # same values, other dtype
        lambda m: m.with_payload(logits=m.payload["logits"].reshape(3, 2)),  # same bytes, other shape
        lambda m: m.with_payload(blob=b"\x00\x02"),
        lambda m: m.with_payload(chunks=[b"a", b"bc"]),  # same concatenation, other split
        lambda m: m.with_payload(extra=b""),
        lambda m: m.with_payload(blob=None),
        lambda m: m.with_meta(n=6),
        lambda m: m.with_meta(**{"sealed.x": {"length": 3, "shape": [1, 3]}}),
        lambda m: m.model_copy(update={"kind": "consensus"}),
        lambda m: m.model_copy(update={"receiver": "bob"}),
        lambda m: m.model_copy(update={"round": 2}),
    ],
)
def test_any_modification_breaks_the_signature(keys, verifier, tamper) -> None:
    signed = keys["alice"].sign(msg())
    assert reason(verifier, tamper(signed)) == "bad signature"


def test_wrong_run_id_and_unknown_sender(keys, verifier) -> None:
    assert reason(verifier, keys["alice"].sign(msg(run_id="run-2"))) == "wrong run id"
    carol = PartyKeys.generate("carol")
    assert reason(verifier, carol.sign(msg("carol"))) == "unknown sender"
    verifier.add_party("carol", public_key_bytes(carol.public_key))
    verifier.verify(carol.sign(msg("carol")))


def test_malformed_messages(keys, verifier) -> None:
    assert reason(verifier, msg()) == "malformed"  # unsigned
    assert reason(verifier, msg(meta={"signature": "zz"})) == "malformed"
    assert reason(verifier, msg(meta={"signature": "00" * 10})) == "malformed"
    assert reason(verifier, msg(meta={"signature": 12345})) == "malformed"
    assert reason(verifier, {"sender": "alice"}) == "malformed"
    signed = keys["alice"].sign(msg())
    assert reason(verifier, signed.with_meta(obj=object())) == "malformed"
    # Raw-bytes signatures are accepted too.
    raw = signed.with_meta(signature=bytes.fromhex(signed.meta["signature"]))
    verifier.verify(raw)


def test_wrong_receiver_and_broadcast(keys) -> None:
    v = MessageVerifier("run-1", {"alice": keys["alice"].public_key}, receiver="bob")
    assert reason(v, keys["alice"].sign(msg(receiver="carol"))) == "wrong receiver"
    v.verify(keys["alice"].sign(msg(receiver="bob")))
    v.verify(keys["alice"].sign(msg(receiver="*", kind="broadcast")))


def test_same_round_to_different_receivers_is_not_a_replay(keys) -> None:
    relay = MessageVerifier("run-1", {"alice": keys["alice"].public_key})
    relay.verify(keys["alice"].sign(msg(receiver="bob", kind="posteriors")))
    relay.verify(keys["alice"].sign(msg(receiver="carol", kind="posteriors")))


def test_rejections_carry_a_loggable_reason(keys, verifier) -> None:
    rejection = verifier.check(keys["alice"].sign(msg(run_id="other")))
    assert rejection is not None and rejection.reason == "wrong run id"
    assert "'other'" in str(rejection) and "'run-1'" in str(rejection)
    assert verifier.check(keys["alice"].sign(msg(round=9))) is None


def test_canonical_bytes_ignore_dict_order_and_the_signature() -> None:
    a = msg(payload={"x": b"1", "y": b"2"}, meta={"p": 1, "q": [1, 2.5, None, True]})
    b = msg(payload={"y": b"2", "x": b"1"}, meta={"q": [1, 2.5, None, True], "p": 1, "signature": "00"})
    assert canonical_bytes(a) == canonical_bytes(b)
    assert canonical_bytes(a) != canonical_bytes(msg(payload={"x": b"1", "y": b"2"}, meta={"p": 1, "q": [1, 2.5, None, 1]}))


def test_canonical_bytes_format_is_frozen() -> None:
    """Nodes of different versions verify each other's signatures only if the signed bytes never change.

    The digest was computed with the first encoder (one bytearray per container); the encoder that
    joins its parts once must produce exactly the same bytes.
    """
    frozen = msg(sender="p0", run_id="run-7", round=3,
                 payload={"logits": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8,
                          "chunks": [b"\x00\x01", b"abc"]},
                 meta={"rate": 0.5, "label_split": [1, 3], "sealed.x": {"scheme": "ckks", "shape": [2]},
                       "flag": True, "none": None, "signature": "00"})
    assert hashlib.sha256(canonical_bytes(frozen)).hexdigest() == (
        "d5b2d2685713def5eedf71f10b062b4183f56ef2917115654b8d14431ca7ec0a")


def test_signing_keys_stay_off_the_wire(keys) -> None:
    with pytest.raises(TypeError, match="Ed25519 signing key"):
        pickle.dumps(keys["alice"])
    with pytest.raises(TypeError, match="private key"):
        assert_wire_safe({"k": keys["alice"].private_key})
    with pytest.raises(ValueError, match="cannot sign a message from 'bob'"):
        keys["alice"].sign(msg("bob"))
    with pytest.raises(TypeError, match="Ed25519PrivateKey"):
        sign_message(msg(), b"not a key")  # type: ignore[arg-type]
