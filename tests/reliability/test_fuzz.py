"""Property-based fuzzing of what reads untrusted input: the config loader and the message decoders.

Every input gives either a valid object or the documented error of that reader, never another exception:

- config text or mapping -> ``ExperimentConfig`` or :class:`securefl.config.ConfigError`;
- wire bytes -> value / ``Message`` or :class:`securefl.core.codec.DecodeError`;
- a mapping -> ``Message`` or ``pydantic.ValidationError``;
- a message's sealed field -> ``SealedTensor`` or ``KeyError`` / ``ValueError`` (as documented);
- CKKS chunks -> ``EncryptedVector`` or :class:`securefl.crypto.errors.CiphertextError`;
- a message to verify -> the message or :class:`securefl.crypto.errors.RejectedMessage`;
- a message through a layer stack's inbound hooks (validation, CKKS or masking; server and participant
  side) -> the message or :class:`securefl.layers.base.Rejected`;
- any object handed to the transport -> itself or ``TypeError`` (``assert_wire_safe``).

The default suite runs a fixed, derandomized set of examples; ``SECUREFL_FUZZ=random`` explores new ones
and ``SECUREFL_FUZZ_EXAMPLES=n`` multiplies how many.
"""

from __future__ import annotations

import math
import os
import string
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from securefl.config import ConfigError, apply_overrides, dump_config, parse_config, parse_config_text
from securefl.core import codec
from securefl.core.message import AGGREGATOR, Message
from securefl.core.sealed import META_PREFIX, SealedTensor
from securefl.crypto.ckks import EncryptedVector, KeyHolderContext
from securefl.crypto.errors import CiphertextError, RejectedMessage
from securefl.crypto.signing import MessageVerifier, PartyKeys
from securefl.crypto.wire import assert_wire_safe
from securefl.layers.base import Rejected
from securefl.layers.validation import ValidationLayer
from tests.conftest import tiny_raw
from tests.reliability.helpers import ValidatedFederation, small_config

SCALE = int(os.environ.get("SECUREFL_FUZZ_EXAMPLES", "1"))


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=os.environ.get("SECUREFL_FUZZ") != "random",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# ----- strategies --------------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["", "none", "ckks", "masking", "fedmd", "mlp_s", "1e999", "-1", "nan"]),
)
json_like = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=12), children, max_size=4)),
    max_leaves=20,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


VALID = {**tiny_raw(), "privacy": {"unit": "participant", "target_epsilon": 4.0}, "secure_aggregation": "masking"}
VALID_PATHS = _paths(VALID)


@st.composite
def mutated_configs(draw: st.DrawFn) -> Any:
    """A valid config with a few random edits: a value replaced, a key dropped, an unknown key added."""
    import copy

    raw: Any = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(VALID_PATHS))
        node = raw
        try:
            for key in path[:-1]:
                node = node[key]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                node[path[-1]] = draw(json_like)
            elif action == "delete" and isinstance(node, dict):
                node.pop(path[-1], None)
            elif isinstance(node, dict):
                node[draw(st.text(string.ascii_lowercase, min_size=1, max_size=8))] = draw(json_like)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed or replaced this path
    return raw


# ----- the config loader -------------------------------------------------------------------------------
def _config_or_error(load: Any) -> None:
    try:
        cfg = load()
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return
    # A valid object: it survives its own round trip.
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


@fuzz(100)
@given(st.text(max_size=200))
@example("a: 2001-13-01")
@example("protocol: !!float abc")
@example("run: {rounds: !!int x}")
@example("[" * 3000)
@example("{a: " * 2000)
@example("a: &x [*x, *x]\nprotocol: fedmd\nparticipants: *x")
@example("protocol: !!binary 'notbase64'")
@example("!!python/object/apply:os.system ['true']")
@example("\x00\x01")
@example("run:\n  rounds: 1e999999")
def test_any_config_text_parses_or_fails_with_one_config_error_line(text: str) -> None:
    _config_or_error(lambda: parse_config_text(text, "fuzz.yaml"))


@fuzz(120)
@given(mutated_configs())
def test_any_mutated_config_mapping_parses_or_fails_with_a_config_error(raw: Any) -> None:
    _config_or_error(lambda: parse_config(raw, "fuzz"))
    # The same mapping as YAML text, through the text loader.
    try:
        text = yaml.safe_dump(raw)
    except (yaml.YAMLError, ValueError, RecursionError):
        return
    _config_or_error(lambda: parse_config_text(text, "fuzz.yaml"))


@fuzz(80)
@given(st.lists(st.tuples(st.lists(st.sampled_from(["run", "rounds", "data", "participants", "0", "7", "model", "x"]),
                                   min_size=1, max_size=4),
                          st.text(max_size=12)), max_size=3))
def test_any_set_override_applies_or_fails_with_a_config_error(overrides: list[tuple[list[str], str]]) -> None:
    import copy

    items = [".".join(path) + "=" + value for path, value in overrides]
    _config_or_error(lambda: parse_config(apply_overrides(copy.deepcopy(VALID), items), "fuzz"))


@fuzz(60)
@given(json_like)
def test_any_yaml_document_as_a_whole_config(raw: Any) -> None:
    _config_or_error(lambda: parse_config(raw, "fuzz"))


# ----- the wire codec -------------------------------------------------------------------------------------
def _decoded_or_error(data: bytes) -> None:
    try:
        codec.decode_message(data)
    except codec.DecodeError as exc:
        assert str(exc)


GOOD = codec.encode_message(Message(sender="p1", receiver=AGGREGATOR, run_id="r", round=1, kind="logits",
                                    payload={"logits": torch.randn(3, 4), "chunks": [b"ab", b"cd"]},
                                    meta={"sealed.chunks": {"scheme": "ckks", "length": 2, "shape": [2]}, "n": 1}))


@fuzz(100)
@given(st.binary(max_size=300))
@example(codec.MAGIC + (10**6).to_bytes(4, "big"))
@example(codec.MAGIC + (3000 * 2).to_bytes(4, "big") + b"[" * 3000 + b"]" * 3000)
def test_any_bytes_decode_to_a_message_or_a_decode_error(data: bytes) -> None:
    _decoded_or_error(data)


@fuzz(120)
@given(st.data())
def test_a_mutated_encoded_message_decodes_or_fails_with_a_decode_error(data: st.DataObject) -> None:
    raw = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        at = data.draw(st.integers(0, len(raw) - 1))
        if action == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del raw[at:at + data.draw(st.integers(1, 40))]
        elif action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        if not raw:
            break
    _decoded_or_error(bytes(raw))


headers = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**66), 2**66), st.text(max_size=8),
              st.sampled_from(["v", "i", "f", "b", "T", "l", "d", "float32", "int64", "bool", "nan", "1e400"])),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.sampled_from(["t", "v", "n", "d", "s", "x"]), c,
                                                                 max_size=5)),
    max_leaves=25,
)


@fuzz(120)
@given(headers, st.binary(max_size=64))
@example({"t": "T", "d": "float32", "s": [2**32, 2**32], "n": 0}, b"")
@example({"t": "T", "d": "float32", "s": [2**62, 4], "n": 0}, b"")
@example({"t": "T", "d": "float32", "s": [0, 2**62], "n": 0}, b"")
@example({"t": "i", "v": "9" * 5000}, b"")
def test_any_well_framed_header_decodes_or_fails_with_a_decode_error(header: Any, body: bytes) -> None:
    import json

    try:
        text = json.dumps(header).encode()
    except (ValueError, RecursionError):
        return
    data = codec.MAGIC + len(text).to_bytes(4, "big") + text + body
    try:
        codec.decode(data)
    except codec.DecodeError as exc:
        assert str(exc)


# ----- Message, sealed values, CKKS chunks, signatures --------------------------------------------------
tensors = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool,
                     torch.uint8, torch.complex64]),
    st.sampled_from([0.0, 1.5, -3.0, math.nan, math.inf, -math.inf]),
)
payload_values = st.one_of(tensors, st.binary(max_size=64), st.lists(st.binary(max_size=64), max_size=3), json_like)
meta_entries = st.fixed_dictionaries(
    {}, optional={"scheme": st.one_of(st.sampled_from(["ckks", "secagg", "rot13"]), json_like),
                  "length": st.one_of(st.integers(-5, 10**9), st.floats(), json_like),
                  "shape": st.one_of(st.lists(st.integers(-3, 10**6), max_size=4), json_like),
                  "dtype": st.one_of(st.sampled_from(["float32", "int64", "bfloat16", "complex128"]), json_like),
                  "ring_bits": st.sampled_from([64, 32, "64"]), "fractional_bits": st.sampled_from([24, 0, None]),
                  "weight": st.one_of(st.floats(), json_like)})
names = st.sampled_from(["logits", "consensus", "x"])
metas = st.dictionaries(st.one_of(names.map(lambda n: META_PREFIX + n), st.sampled_from(["signature", "withheld", "n"])),
                        st.one_of(meta_entries, json_like, st.text(string.hexdigits, max_size=130)), max_size=4)


@fuzz(120)
@given(st.dictionaries(st.sampled_from(["sender", "receiver", "run_id", "round", "kind", "payload", "meta", "x"]),
                       st.one_of(json_like, st.dictionaries(names, payload_values, max_size=3), metas), max_size=8))
def test_any_mapping_is_a_message_or_a_validation_error(fields: dict[str, Any]) -> None:
    try:
        Message.model_validate(fields)
    except pydantic.ValidationError:
        pass


@st.composite
def messages(draw: st.DrawFn, *, valid_sealed: list[Message] | None = None) -> Message:
    if valid_sealed and draw(st.booleans()):
        return _mutate(draw, draw(st.sampled_from(valid_sealed)))
    return Message(
        sender=draw(st.sampled_from(["p0", "p1", "p2", AGGREGATOR, "mallory"])),
        receiver=draw(st.sampled_from([AGGREGATOR, "p1", "*"])),
        run_id=draw(st.sampled_from(["fuzz", "other"])),
        round=draw(st.sampled_from([0, 1, 2, 10**12])),
        kind=draw(st.sampled_from(["logits", "consensus", "secagg/unmask", "x"])),
        payload=draw(st.dictionaries(names, st.one_of(tensors, st.binary(max_size=64),
                                                      st.lists(st.binary(max_size=64), max_size=3)), max_size=2)),
        meta=draw(metas),
    )


def _mutate(draw: st.DrawFn, msg: Message) -> Message:
    """A genuine sealed message with its chunks or its public description broken."""
    name = next(iter(msg.payload))
    chunks = list(msg.payload[name])
    entry = dict(msg.meta[META_PREFIX + name])
    what = draw(st.sampled_from(["flip", "cut", "extend", "drop", "swap", "meta"]))
    if what == "flip" and chunks and chunks[0]:
        raw = bytearray(chunks[0])
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        chunks[0] = bytes(raw)
    elif what == "cut" and chunks:
        chunks[-1] = chunks[-1][: draw(st.integers(0, max(0, len(chunks[-1]) - 1)))]
    elif what == "extend" and chunks:
        chunks[-1] = chunks[-1] + draw(st.binary(min_size=1, max_size=16))
    elif what == "drop":
        chunks = chunks[1:]
    elif what == "swap":
        chunks = chunks[::-1] + chunks
    else:
        key = draw(st.sampled_from(["scheme", "length", "shape", "dtype", "ring_bits", "fractional_bits", "weight"]))
        entry[key] = draw(json_like)
    return msg.with_payload(**{name: chunks}).with_meta(**{META_PREFIX + name: entry})


@pytest.fixture(scope="module")
def ckks_key() -> KeyHolderContext:
    return KeyHolderContext.generate()


@pytest.fixture(scope="module")
def genuine_sealed(ckks_key: KeyHolderContext) -> Message:
    # Made once: a CKKS ciphertext's length varies between encryptions, and the examples must replay.
    return ckks_key.seal(torch.randn(3, 2), field="logits").attach(
        Message(sender="p1", receiver=AGGREGATOR, run_id="fuzz", round=1, kind="logits"), "logits")


@fuzz(100)
@given(data=st.data())
def test_any_sealed_field_reads_back_or_fails_as_documented(data: st.DataObject, ckks_key: KeyHolderContext,
                                                            genuine_sealed: Message) -> None:
    msg = data.draw(messages(valid_sealed=[genuine_sealed]))
    for name in ("logits", "consensus", "x"):
        try:
            sealed = SealedTensor.from_message(msg, name)
        except (KeyError, ValueError):
            continue
        # A sealed value that reads back is consistent, and opening it fails only as CKKS documents.
        assert math.prod(sealed.shape) == sealed.length >= 1
        try:
            ckks_key.open(sealed)
        except (CiphertextError, ValueError):
            pass


@fuzz(100)
@given(chunks=st.lists(st.binary(max_size=120), max_size=3), length=st.integers(-2, 5000),
       shape=st.lists(st.integers(-2, 5000), max_size=3).map(tuple))
def test_any_ckks_chunks_load_or_fail_with_a_ciphertext_error(chunks: list[bytes], length: int,
                                                              shape: tuple[int, ...], ckks_key: KeyHolderContext) -> None:
    try:
        EncryptedVector.from_wire(ckks_key.public(), chunks, length, shape)
    except CiphertextError:
        pass


@fuzz(60)
@given(data=st.data())
def test_a_forged_ckks_body_behind_a_valid_digest_fails_with_a_ciphertext_error(
        data: st.DataObject, ckks_key: KeyHolderContext, genuine_sealed: Message) -> None:
    # The digest is not a MAC: a participant can break the body and recompute it, so TenSEAL's own
    # parser is what stands between the bytes and the aggregator.
    import hashlib

    from securefl.crypto.ckks.wire import _CHUNK_HEADER, _DIGEST_AT

    chunk = bytearray(genuine_sealed.payload["logits"][0])
    body = bytearray(chunk[_CHUNK_HEADER.size:])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            body[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del body[at:at + data.draw(st.integers(1, 64))]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        if not body:
            body = bytearray(b"\x00")
    prefix = bytes(chunk[:_DIGEST_AT])
    forged = prefix + hashlib.sha256(prefix + bytes(body)).digest()[:16] + bytes(body)
    sealed = SealedTensor.from_message(genuine_sealed, "logits")
    try:
        vec = EncryptedVector.from_wire(ckks_key.public(), [forged], sealed.length, sealed.shape)
    except CiphertextError:
        return
    assert vec.length == sealed.length  # TenSEAL accepted it: a well-formed (if meaningless) ciphertext


@pytest.fixture(scope="module")
def verifier() -> tuple[MessageVerifier, PartyKeys]:
    keys = PartyKeys.generate("p1")
    return MessageVerifier("fuzz", {"p1": keys.public_key, "p0": PartyKeys.generate("p0").public_key}), keys


@fuzz(120)
@given(msg=messages(), sign=st.booleans())
def test_any_message_verifies_or_is_rejected_with_a_reason(msg: Message, sign: bool,
                                                           verifier: tuple[MessageVerifier, PartyKeys]) -> None:
    check, keys = verifier
    if sign and msg.sender == "p1":
        try:
            msg = keys.sign(msg)
        except TypeError:
            assume(False)  # meta the signer itself cannot encode: never sent
    try:
        check.verify(msg)
    except RejectedMessage as exc:
        assert exc.reason in {"malformed", "unknown sender", "wrong run id", "wrong receiver", "bad signature",
                              "replay", "stale"}


# ----- whole inbound stacks -------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["none", "ckks", "masking"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The layers of a real federation (validation first, then sealing; no signing, so nothing stops a
    random message before the deeper decoders), started on round 1, and genuine sealed uplinks."""
    cfg = small_config(secure=request.param, signing=False, run={"name": "fuzz"})
    fed = ValidatedFederation(cfg, tmp_path_factory.mktemp(request.param) / "run", progress=False)
    layers = fed.layers
    for layer in layers:
        layer.start_round(1, ["p0", "p1", "p2"])
    genuine = []
    for party in fed.parties:
        msg = Message(sender=party.id, receiver=AGGREGATOR, run_id="fuzz", round=1, kind="logits",
                      payload={"logits": torch.randn(60, 10)})
        for layer in layers:
            msg = layer.outbound(msg, party)
        genuine.append(msg)
    return {"layers": layers, "party": fed.parties[1], "genuine": genuine if request.param != "none" else None}


@fuzz(100)
@given(data=st.data())
def test_any_message_through_the_inbound_stacks_is_accepted_or_rejected(data: st.DataObject,
                                                                         stack: dict[str, Any]) -> None:
    msg = data.draw(messages(valid_sealed=stack["genuine"]))
    for side in ("server", "participant"):
        current = msg
        try:
            for layer in reversed(stack["layers"]):
                current = (layer.server_inbound(current) if side == "server"
                           else layer.inbound(current, stack["party"]))
        except Rejected as exc:
            assert exc.reason and exc.sender == msg.sender


def test_the_genuine_uplinks_pass_the_stacks(stack: dict[str, Any]) -> None:
    # The fuzz above must not pass vacuously: what honest participants send is accepted, once each.
    validation = stack["layers"][0]
    assert isinstance(validation, ValidationLayer)
    validation.start_round(1, ["p0", "p1", "p2"])  # forget what the fuzzing accepted
    for msg in stack["genuine"] or []:
        current = msg
        for layer in reversed(stack["layers"]):
            current = layer.server_inbound(current)
        with pytest.raises(Rejected, match="duplicate"):
            for layer in reversed(stack["layers"]):
                layer.server_inbound(msg)


# ----- assert_wire_safe -------------------------------------------------------------------------------------
class _Holder:
    def __init__(self, value: Any) -> None:
        self.value = value


@fuzz(80)
@given(obj=st.recursive(st.one_of(scalars, tensors, st.binary(max_size=8)),
                        lambda c: st.one_of(st.lists(c, max_size=3), st.tuples(c, c),
                                            st.dictionaries(st.text(max_size=4), c, max_size=3),
                                            c.map(_Holder), st.frozensets(st.integers(), max_size=3)),
                        max_leaves=15),
       with_secret=st.booleans())
def test_anything_handed_to_the_transport_passes_or_fails_with_a_type_error(obj: Any, with_secret: bool,
                                                                            ckks_key: KeyHolderContext) -> None:
    if with_secret:
        obj = [obj, _Holder({"k": ckks_key})]
    try:
        assert assert_wire_safe(obj) is obj
        assert not with_secret
    except TypeError as exc:
        assert with_secret and "KeyHolderContext holds a CKKS secret key" in str(exc)


def test_the_fuzzed_readers_accept_what_they_should(tmp_path: Path) -> None:
    # Guards against vacuous fuzzing: the valid inputs the strategies start from are accepted.
    assert parse_config(VALID).secure_aggregation == "masking"
    assert parse_config_text(yaml.safe_dump(VALID)).privacy.unit == "participant"
    decoded = codec.decode_message(GOOD)
    assert isinstance(decoded, Message) and decoded.tensor("logits").shape == (3, 4)
