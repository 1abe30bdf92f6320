"""SealedTensor wire form, the protocol-side helpers, and assert_wire_safe."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from securefl.core.sealed import SealedTensor, attach, is_sealed, open_field
from securefl.crypto import assert_wire_safe, holds_secret
from securefl.crypto.wire import SecretHolder


def test_sealed_tensor_validates_itself() -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 2\) holds 4 elements, not length 3"):
        SealedTensor(chunks=(b"x",), length=3, shape=(2, 2))
    with pytest.raises(ValueError, match="positive"):
        SealedTensor(chunks=(b"x",), length=0, shape=(0,))
    with pytest.raises(ValueError, match="unknown sealed dtype"):
        SealedTensor(chunks=(b"x",), length=1, shape=(1,), dtype="complex32")
    with pytest.raises(TypeError, match="bytes"):
        SealedTensor(chunks=("x",), length=1, shape=(1,))  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SealedTensor(chunks=(b"x",), length=1, shape=(1,)).length = 2  # type: ignore[misc]


def test_sealed_fields_round_trip_through_a_message(make_msg) -> None:
    a = SealedTensor(chunks=(b"a", b"b"), length=6, shape=(2, 3), scheme="ckks", dtype="float64")
    b = SealedTensor(chunks=(b"c",), length=2, shape=(2,), scheme="secagg", params={"ring_bits": 64})
    m = b.attach(a.attach(make_msg(), "first"), "second")
    assert m.payload["first"] == [b"a", b"b"] and m.meta["sealed.first"]["shape"] == [2, 3]
    assert SealedTensor.from_message(m, "first") == a
    assert SealedTensor.from_message(m, "second") == b
    assert is_sealed(m, "first") and not is_sealed(m, "third")
    with pytest.raises(KeyError, match="no sealed field 'third'.*sealed: \\['first', 'second'\\]"):
        SealedTensor.from_message(m, "third")
    broken = m.with_meta(**{"sealed.first": {"scheme": "ckks"}})
    with pytest.raises(ValueError, match="malformed sealed field 'first'"):
        SealedTensor.from_message(broken, "first")


def test_attach_and_open_plaintext_fields(make_msg) -> None:
    t = torch.ones(3)
    m = attach(make_msg(), "consensus", t)
    assert not is_sealed(m, "consensus")
    assert open_field(m, "consensus") is t
    with pytest.raises(TypeError, match="expected Tensor or SealedTensor"):
        attach(make_msg(), "x", [1, 2])  # type: ignore[arg-type]


class _Participant:
    def __init__(self, secret: object) -> None:
        self.model = torch.nn.Linear(2, 2)
        self.state = {"round": 3, "keys": [secret]}


class _Secret(SecretHolder):
    _secret_kind = "test secret"


def test_assert_wire_safe_walks_objects_and_names_the_path(make_msg) -> None:
    with pytest.raises(TypeError, match=r"object\.state\['keys'\]\[0\]: _Secret holds a test secret"):
        assert_wire_safe(_Participant(_Secret()))
    assert holds_secret(_Participant(_Secret()))
    assert not holds_secret(_Participant(None))
    m = make_msg(payload={"x": torch.ones(2)}, meta={"nested": {"list": [1, "a", b"b", None]}})
    assert assert_wire_safe(m) is m
    cyclic: list = []
    cyclic.append(cyclic)
    assert_wire_safe(cyclic)


def test_sealed_helpers_do_not_import_crypto_libraries() -> None:
    # Protocols may use SealedTensor/attach/open_field; architecture.md forbids them to import tenseal.
    code = (
        "import sys; from securefl.crypto import SealedTensor, attach, open_field, assert_wire_safe; "
        "assert 'tenseal' not in sys.modules and 'cryptography' not in sys.modules, "
        "[m for m in sys.modules if m.startswith(('tenseal', 'cryptography'))]"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
