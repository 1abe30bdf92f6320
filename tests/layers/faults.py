"""A transport that injects faults into chosen messages (tests only)."""

from __future__ import annotations

from collections.abc import Callable

from securefl.runtime.message import Message
from securefl.runtime.transport import InProcessTransport

Fault = Callable[[Message], list[Message]]


class FaultyTransport(InProcessTransport):
    """Applies ``fault`` to every message matching ``when``; the fault returns what is delivered instead."""

    def __init__(self, when: Callable[[Message], bool], fault: Fault) -> None:
        super().__init__()
        self.when = when
        self.fault = fault
        self.injected = 0

    def send(self, msg: Message) -> None:
        if self.when(msg):
            self.injected += 1
            for out in self.fault(msg):
                super().send(out)
        else:
            super().send(msg)
