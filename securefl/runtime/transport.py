"""Transports move :class:`Message` objects between parties.

The in-process transport is the default (simulation). Other transports
(OS processes over loopback, Flower) implement the same two methods, so the
round loop and the protocols run unchanged whatever carries the bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict

import torch

from securefl.core.message import Message


def payload_nbytes(msg: Message) -> int:
    """Bytes a message's payload would take on the wire (tensors at their dtype's size)."""
    total = 0
    for value in msg.payload.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, bytes):
            total += len(value)
        else:
            total += sum(len(v) for v in value)
    return total


class Transport(ABC):
    """Delivers messages to named inboxes."""

    @abstractmethod
    def send(self, msg: Message) -> None: ...

    @abstractmethod
    def receive(self, party_id: str) -> list[Message]:
        """Drain and return everything waiting for ``party_id``, in arrival order."""


class InProcessTransport(Transport):
    """Inboxes in memory. Counts messages and payload bytes per kind for the metrics."""

    def __init__(self) -> None:
        self._inboxes: dict[str, list[Message]] = defaultdict(list)
        self.bytes_by_kind: dict[str, int] = defaultdict(int)
        self.messages_by_kind: dict[str, int] = defaultdict(int)

    def send(self, msg: Message) -> None:
        self._inboxes[msg.receiver].append(msg)
        self.bytes_by_kind[msg.kind] += payload_nbytes(msg)
        self.messages_by_kind[msg.kind] += 1

    def receive(self, party_id: str) -> list[Message]:
        return self._inboxes.pop(party_id, [])

    def reset_counters(self) -> None:
        self.bytes_by_kind.clear()
        self.messages_by_kind.clear()
