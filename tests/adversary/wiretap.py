"""What an attacker that sits where the coordinator sits gets to see: every message that crosses it.

Shared by the adversary tests of findings 3-7 of issue 19 (what protocols release around the DP layer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from securefl.core.message import AGGREGATOR, Message
from securefl.layers.base import LayerSetupError
from securefl.protocols import ProtocolSetupError
from securefl.runtime.federation import Federation
from securefl.runtime.transport import InProcessTransport

# A refusal before round 1 is one of these (the privacy set-up raises LayerSetupError, a protocol ProtocolSetupError).
REFUSALS = (LayerSetupError, ProtocolSetupError)


class Wiretap(InProcessTransport):
    """The coordinator's transport, keeping a copy of everything it relays (it relays every message)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Message] = []

    def send(self, msg: Message) -> None:
        self.seen.append(msg)
        super().send(msg)

    def uplinks(self) -> list[Message]:
        return [m for m in self.seen if m.receiver == AGGREGATOR]


def run_or_refusal(config: Any, out: Path, transport: Wiretap, *,
                   before_run: Callable[[Federation], None] | None = None) -> tuple[Federation | None, str | None]:
    """Set the run up and run it as the coordinator would (``before_run`` may plant more taps). Returns
    (the federation, None) when it ran, or (None, the refusal) when it was refused before round 1."""
    try:
        fed = Federation(config, out, transport=transport, progress=False)
    except REFUSALS as exc:
        return None, str(exc)
    if before_run is not None:
        before_run(fed)
    fed.run()
    return fed, None
