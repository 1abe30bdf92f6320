from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .helpers import key_from_seed


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return key_from_seed(7)


@pytest.fixture
def other_key() -> Ed25519PrivateKey:
    return key_from_seed(99)
