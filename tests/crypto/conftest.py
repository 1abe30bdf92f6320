"""Shared fixtures for the securefl.crypto tests.

CKKS key generation is cheap (~20 ms at N = 8192), but encryption is ~5 ms per
4,096 slots, so the tests keep vectors short and share one committee key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from securefl.core.message import AGGREGATOR, Message
from securefl.crypto.ckks import KeyHolderContext, PublicContext


@pytest.fixture(scope="session")
def key_ctx() -> KeyHolderContext:
    return KeyHolderContext.generate()


@pytest.fixture(scope="session")
def public_ctx(key_ctx: KeyHolderContext) -> PublicContext:
    # Through the wire format, as the aggregator would receive it.
    return PublicContext.from_bytes(key_ctx.public().to_bytes())


@pytest.fixture
def make_msg() -> Callable[..., Message]:
    def make(
        sender: str = "p0",
        *,
        receiver: str = AGGREGATOR,
        run_id: str = "run-1",
        round: int = 1,
        kind: str = "logits",
        payload: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Message:
        return Message(
            sender=sender, receiver=receiver, run_id=run_id, round=round, kind=kind, payload=payload or {}, meta=meta or {}
        )

    return make
