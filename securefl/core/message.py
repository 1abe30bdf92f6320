"""The unit that crosses the wire between parties.

A :class:`Message` is frozen: layers (DP, encryption, signing) never mutate a
message in place, they return a new one with :meth:`Message.with_payload`. That
keeps the audit story simple: what a protocol produced and what left the
participant are two distinct objects that can both be inspected in tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, field_validator

# A payload value is a tensor (plaintext), bytes (a serialized ciphertext or a
# signature) or a list of bytes (a ciphertext split over several CKKS vectors).
PayloadValue = torch.Tensor | bytes | list[bytes]

BROADCAST = "*"
AGGREGATOR = "aggregator"


class Message(BaseModel):
    """A signed-able, frozen envelope around a payload of named tensors or bytes.

    Built from untrusted values (``Message.model_validate(data)``), it either validates or raises
    ``pydantic.ValidationError`` naming the field; nothing else (``tests/reliability/test_fuzz.py``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    sender: str
    receiver: str
    run_id: str
    round: int
    kind: str
    payload: dict[str, Any] = {}
    # Free-form, non-secret annotations that travel in the clear (e.g. HeteroFL's
    # rates and label splits, which give its per-element counts, or a signature).
    meta: dict[str, Any] = {}

    @field_validator("payload")
    @classmethod
    def _payload_values_are_wire_types(cls, payload: dict[str, Any]) -> dict[str, Any]:
        for name, value in payload.items():
            if isinstance(value, np.ndarray):
                raise ValueError(f"payload field {name!r}: numpy arrays are not wire types; use torch.from_numpy")
            ok = isinstance(value, torch.Tensor | bytes) or (
                isinstance(value, list) and all(isinstance(v, bytes) for v in value)
            )
            if not ok:
                raise ValueError(
                    f"payload field {name!r} has type {type(value).__name__}; "
                    "allowed: torch.Tensor, bytes, list[bytes]"
                )
        return payload

    @field_validator("round")
    @classmethod
    def _round_non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"round must be >= 0, got {value}")
        return value

    def with_payload(self, **changes: Any) -> Message:
        """Return a copy with some payload fields replaced (``None`` removes a field)."""
        payload = dict(self.payload)
        for key, value in changes.items():
            if value is None:
                payload.pop(key, None)
            else:
                payload[key] = value
        return self.model_copy(update={"payload": payload})

    def with_meta(self, **changes: Any) -> Message:
        meta = dict(self.meta)
        meta.update(changes)
        return self.model_copy(update={"meta": meta})

    def tensor(self, name: str) -> torch.Tensor:
        value = self.payload.get(name)
        if not isinstance(value, torch.Tensor):
            raise KeyError(
                f"message {self.kind!r} from {self.sender!r} has no plaintext tensor field {name!r} "
                f"(fields: {sorted(self.payload)})"
            )
        return value
