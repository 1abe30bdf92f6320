"""Ed25519 message signing and the verifier's rejections."""

from __future__ import annotations

import hashlib
import pickle
import struct

import pytest
import torch

from securefl.core.message import Message
from securefl.crypto import assert_wire_safe
from securefl.crypto.errors import RejectedMessage
from securefl.crypto.signing import (
    MessageVerifier,
    PartyKeys,
    canonical_bytes,
    generate_signing_key,
    message_digest,
    public_key_bytes,
    sign_message,
)


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


def test_a_verifier_with_a_state_file_refuses_replays_a_later_process_sees(keys, tmp_path) -> None:
    """A node's process may live for one message (Flower): the next process reads what the last accepted."""
    from securefl.crypto.signing import ReplayStateError

    public = {pid: k.public_key for pid, k in keys.items()}
    state = tmp_path / "replay" / "aggregator.replay.json"
    first = keys["alice"].sign(msg(round=3, meta={"nonce": "a1"}))
    MessageVerifier("run-1", public, state_file=state).verify(first)
    later = MessageVerifier("run-1", public, state_file=state)
    assert reason(later, first) == "replay" and later.seen_before(first) == "replay"
    assert reason(later, keys["alice"].sign(msg(round=2, meta={"nonce": "b2"}))) == "stale"
    # The sender redoing round 3 (a resumed coordinator) signs afresh: a new process accepts that once.
    redo = keys["alice"].sign(msg(round=3, meta={"nonce": "c3"}))
    assert later.seen_before(redo) is None
    later.verify(redo)
    assert reason(later, keys["alice"].sign(msg(round=3, meta={"nonce": "d4"}))) == "replay"  # same process
    assert reason(MessageVerifier("run-1", public, state_file=state), redo) == "replay"
    # A record of another run, or an unreadable one, is refused rather than taken as empty.
    with pytest.raises(ReplayStateError, match="of run 'run-1', not of run 'run-2'"):
        MessageVerifier("run-2", public, state_file=state)
    state.write_text("{half")
    with pytest.raises(ReplayStateError, match="unreadable"):
        MessageVerifier("run-1", public, state_file=state)


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


def _frozen_message() -> Message:
    return msg(sender="p0", run_id="run-7", round=3,
               payload={"logits": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8,
                        "chunks": [b"\x00\x01", b"abc"]},
               meta={"rate": 0.5, "label_split": [1, 3], "sealed.x": {"scheme": "ckks", "shape": [2]},
                     "flag": True, "none": None, "signature": "00"})


def _spec_digest(m: Message) -> bytes:
    """Format v2 written out by hand from the module docstring, independently of the encoder."""
    def u64(n: int) -> bytes:
        return struct.pack("<Q", n)

    def enc(v) -> bytes:  # type: ignore[no-untyped-def]
        if v is None:
            return b"N"
        if isinstance(v, bool):
            return b"?" + bytes([v])
        if isinstance(v, int):
            return b"i" + u64(len(str(v))) + str(v).encode()
        if isinstance(v, float):
            return b"f" + struct.pack("<d", v)
        if isinstance(v, str):
            return b"s" + u64(len(v.encode())) + v.encode()
        if isinstance(v, bytes):
            return b"b" + u64(len(v)) + hashlib.sha256(v).digest()
        if isinstance(v, torch.Tensor):
            header = f"{str(v.dtype).removeprefix('torch.')}|{','.join(map(str, v.shape))}".encode()
            body = v.contiguous().numpy().tobytes()
            return b"T" + u64(len(header)) + header + b"r" + u64(len(body)) + hashlib.sha256(body).digest()
        if isinstance(v, list):
            return b"L" + u64(len(v)) + b"".join(enc(x) for x in v)
        assert isinstance(v, dict)
        return b"D" + u64(len(v)) + b"".join(enc(k) + enc(v[k]) for k in sorted(v))

    meta = {k: v for k, v in m.meta.items() if k != "signature"}
    stream = b"".join(enc(x) for x in (m.sender, m.receiver, m.run_id, m.kind, m.round, m.payload, meta))
    return hashlib.sha256(stream).digest()


def test_signed_bytes_follow_the_documented_v2_format() -> None:
    m = _frozen_message()
    assert message_digest(m) == _spec_digest(m)
    assert canonical_bytes(m) == b"securefl/message/v2\x00sha256\x00" + _spec_digest(m)


def test_canonical_bytes_format_is_frozen() -> None:
    """Nodes of different versions verify each other's signatures only if the signed bytes never change.

    Format v2 (hash-then-sign) replaced v1 (Ed25519 over the whole encoding); this digest pins v2.
    """
    assert hashlib.sha256(canonical_bytes(_frozen_message())).hexdigest() == (
        "48d58276ad26f5a6ada85d05789cf2098e830d8137481bf1e74f8314cbae59d9")


def test_a_v1_signature_does_not_verify(keys, verifier) -> None:
    """Ed25519 over something else than the v2 statement (e.g. an older node's v1 bytes) is a bad signature."""
    m = msg()
    others = (message_digest(m), b"securefl/message/v1\x00" + message_digest(m), canonical_bytes(m)[:-1],
              b"securefl/message/v1\x00" + b"".join(str(getattr(m, f)).encode() for f in ("sender", "kind")))
    for other in others:
        sig = keys["alice"].private_key.sign(other).hex()
        assert reason(verifier, m.with_meta(signature=sig)) == "bad signature"


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1 :]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_flipped_byte_anywhere_in_a_large_payload_is_rejected(keys, where) -> None:
    """A 4 MB tensor and a CKKS-like list of 330 kB chunks: one bit anywhere breaks the signature."""
    gen = torch.Generator().manual_seed(0)
    tensor = torch.randn(1_000_000, generator=gen)
    chunks = [bytes(torch.randint(0, 256, (330_000,), dtype=torch.uint8, generator=gen).numpy()) for _ in range(3)]
    signed = keys["alice"].sign(msg(payload={"logits": tensor, "chunks": chunks}))
    MessageVerifier("run-1", {"alice": keys["alice"].public_key}).verify(signed)

    raw = tensor.numpy().tobytes()
    at = {"first": 0, "middle": len(raw) // 2 + 1, "last": len(raw) - 1}[where]
    flipped_tensor = torch.frombuffer(bytearray(_flip(raw, at)), dtype=torch.float32)
    c = {"first": 0, "middle": 1, "last": 2}[where]
    at_chunk = {"first": 0, "middle": 165_001, "last": 329_999}[where]
    flipped_chunks = [_flip(x, at_chunk) if i == c else x for i, x in enumerate(chunks)]
    for tampered in (signed.with_payload(logits=flipped_tensor), signed.with_payload(chunks=flipped_chunks)):
        verifier = MessageVerifier("run-1", {"alice": keys["alice"].public_key})
        assert reason(verifier, tampered) == "bad signature"


@pytest.mark.parametrize(
    "change",
    [
        lambda meta: {**meta, "n": 6},
        lambda meta: {**meta, "new": None},
        lambda meta: {k: v for k, v in meta.items() if k != "n"},
        lambda meta: {**meta, "sealed.x": {**meta["sealed.x"], "length": 4}},
        lambda meta: {**meta, "sealed.x": {**meta["sealed.x"], "extra": b""}},
        lambda meta: {**meta, "n": 5.0},  # same value, other type
        lambda meta: {**meta, "n": "5"},
    ],
)
def test_the_digest_covers_meta(keys, verifier, change) -> None:
    signed = keys["alice"].sign(msg())
    tampered = signed.model_copy(update={"meta": change(dict(signed.meta))})
    assert message_digest(tampered) != message_digest(signed)
    assert reason(verifier, tampered) == "bad signature"


def test_a_signer_reuses_digests_only_of_the_very_same_bytes(keys) -> None:
    """The server signs one aggregate per receiver and hashes it once; a new or mutable value is hashed again."""
    server = PartyKeys.generate("aggregator")
    chunk = bytes(200_000)
    down = Message(sender="aggregator", receiver="p0", run_id="run-1", round=1, kind="consensus",
                   payload={"consensus": [chunk, b"tail"]})
    signed = {pid: server.sign(down.model_copy(update={"receiver": pid})) for pid in ("p0", "p1")}
    for pid, m in signed.items():
        MessageVerifier("run-1", {"aggregator": server.public_key}, receiver=pid).verify(m)
    # Each signature binds its receiver: swapped, both fail.
    p1_sig = signed["p1"].meta["signature"]
    assert reason(MessageVerifier("run-1", {"aggregator": server.public_key}, receiver="p0"),
                  signed["p0"].with_meta(signature=p1_sig)) == "bad signature"

    # Equal length, other content, another object: hashed afresh.
    other = bytearray(chunk)
    other[100_000] = 1
    changed = server.sign(down.with_payload(consensus=[bytes(other), b"tail"]))
    assert message_digest(changed) != message_digest(signed["p0"])
    MessageVerifier("run-1", {"aggregator": server.public_key}).verify(changed)

    # A bytearray in meta can change in place between two signatures: never taken from the memo.
    blob = bytearray(100_000)
    first = server.sign(down.with_meta(blob=blob))
    blob[0] = 7
    second = server.sign(down.model_copy(update={"round": 2}).with_meta(blob=blob))
    MessageVerifier("run-1", {"aggregator": server.public_key}).verify(second)  # not the stale digest
    # ``first`` holds the same bytearray: changed after signing, it no longer verifies.
    assert reason(MessageVerifier("run-1", {"aggregator": server.public_key}), first) == "bad signature"


def test_signing_keys_stay_off_the_wire(keys) -> None:
    with pytest.raises(TypeError, match="Ed25519 signing key"):
        pickle.dumps(keys["alice"])
    with pytest.raises(TypeError, match="private key"):
        assert_wire_safe({"k": keys["alice"].private_key})
    with pytest.raises(ValueError, match="cannot sign a message from 'bob'"):
        keys["alice"].sign(msg("bob"))
    with pytest.raises(TypeError, match="Ed25519PrivateKey"):
        sign_message(msg(), b"not a key")  # type: ignore[arg-type]
