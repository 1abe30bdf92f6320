"""The CKKS aggregator: sums, means and weighted means of ciphertexts, under the public context only.

It is the server's side of CKKS secure aggregation (:class:`securefl.layers.secure_aggregation.CkksLayer`
swaps it in for the plain aggregator): it adds the participants' ciphertexts and multiplies them by public
plaintext weights, and returns sealed aggregates that only the key holders can open. The cryptography is
:mod:`securefl.crypto.ckks`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from securefl.core.aggregator import AggregationError, Aggregator, require_one_shape, require_replies
from securefl.core.message import Message
from securefl.core.sealed import SealedTensor
from securefl.crypto.ckks.context import KeyHolderContext, PublicContext
from securefl.crypto.ckks.vector import EncryptedVector
from securefl.crypto.errors import CiphertextError

__all__ = ["CkksAggregator"]

Weights = Sequence[float] | Mapping[str, float] | torch.Tensor | np.ndarray


def _normalised_weights(replies: Sequence[Message], weights: Weights) -> list[float]:
    """Resolve weights (aligned list, or mapping sender -> weight) and normalise them to sum 1."""
    if isinstance(weights, Mapping):
        missing = [r.sender for r in replies if r.sender not in weights]
        if missing:
            raise ValueError(f"weighted_mean: no weight for senders {missing} (weights given for {sorted(weights)})")
        raw = [float(weights[r.sender]) for r in replies]
    else:
        if isinstance(weights, torch.Tensor):
            weights = weights.detach().cpu().tolist()
        raw = [float(w) for w in weights]
        if len(raw) != len(replies):
            raise ValueError(f"weighted_mean: {len(raw)} weights for {len(replies)} replies")
    for reply, w in zip(replies, raw, strict=True):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weighted_mean: weight of {reply.sender!r} must be finite and >= 0, got {w}")
    total = math.fsum(raw)
    if total <= 0:
        raise ValueError(f"weighted_mean: weights sum to {total}; at least one must be positive")
    return [w / total for w in raw]


def _contributors(replies: Sequence[Message]) -> dict[str, Any]:
    """The public facts an aggregate carries: how many replies it sums, and whose. A key holder opens no
    aggregate of fewer than the run's minimum cohort (:mod:`securefl.privacy.cohort`), and an individual
    upload, which carries no such list, not at all."""
    return {"n": len(replies), "contributors": sorted(r.sender for r in replies)}


class CkksAggregator(Aggregator):
    """The aggregator interface over CKKS ciphertexts; holds only a :class:`PublicContext`.

    Every reply carries field ``field`` as a sealed CKKS tensor (see
    :func:`~securefl.crypto.ckks.context.seal_tensor`). Results are :class:`SealedTensor` values: a protocol
    forwards them in a message untouched (``result.attach(msg, name)``) and key
    holders open them (``key_ctx.open(SealedTensor.from_message(msg, name))``).
    """

    name = "ckks"
    scheme = "ckks"

    def __init__(self, public_ctx: PublicContext) -> None:
        if isinstance(public_ctx, KeyHolderContext):
            raise TypeError("CkksAggregator must be given a PublicContext; a KeyHolderContext holds the secret key")
        if not isinstance(public_ctx, PublicContext):
            raise TypeError(f"CkksAggregator needs a PublicContext, got {type(public_ctx).__name__}")
        self.ctx = public_ctx
        # Vectors the server's inbound check already deserialized and validated, by (sender, field):
        # parsing a reply costs as much as adding it, so it is done once per reply, not twice.
        self._parsed: dict[tuple[str, str], tuple[tuple[bytes, ...], EncryptedVector]] = {}

    def hand_over(self, sender: str, field: str, sealed: SealedTensor, vector: EncryptedVector) -> None:
        """Keep ``vector``, parsed from ``sealed`` with :meth:`EncryptedVector.from_wire`, for one aggregation."""
        self._parsed[(sender, field)] = (sealed.chunks, vector)

    def forget_parsed(self) -> None:
        self._parsed.clear()

    def _parsed_vector(self, sender: str, field: str, sealed: SealedTensor) -> EncryptedVector | None:
        """The handed-over vector of exactly these chunk objects (bytes are immutable), used up on use."""
        entry = self._parsed.pop((sender, field), None)
        if entry is None:
            return None
        chunks, vector = entry
        same = len(chunks) == len(sealed.chunks) and all(a is b for a, b in zip(chunks, sealed.chunks, strict=True))
        if not same or (vector.length, vector.shape) != (sealed.length, tuple(sealed.shape)):
            return None
        return vector

    def _load(self, replies: Sequence[Message], field: str) -> tuple[list[EncryptedVector], SealedTensor]:
        require_replies(replies, field)
        senders = [r.sender for r in replies]
        dupes = sorted({s for s in senders if senders.count(s) > 1})
        if dupes:
            raise ValueError(f"field {field!r}: several replies from {dupes}; each participant counts once")
        loaded: list[EncryptedVector] = []
        first: SealedTensor | None = None
        for reply in replies:
            sealed = SealedTensor.from_message(reply, field)
            if sealed.scheme != "ckks":
                raise ValueError(f"reply from {reply.sender!r}, field {field!r}: scheme {sealed.scheme!r}, expected 'ckks'")
            if first is None:
                first = sealed
            require_one_shape(field, [(replies[0].sender, tuple(first.shape)), (reply.sender, tuple(sealed.shape))])
            if sealed.dtype != first.dtype:
                raise AggregationError(f"field {field!r}: reply from {reply.sender!r} is {sealed.dtype}, reply from "
                                       f"{replies[0].sender!r} is {first.dtype}")
            parsed = self._parsed_vector(reply.sender, field, sealed)
            if parsed is not None:
                loaded.append(parsed)
                continue
            try:
                loaded.append(EncryptedVector.from_wire(self.ctx, sealed.chunks, sealed.length, sealed.shape))
            except CiphertextError as exc:
                raise CiphertextError(f"reply from {reply.sender!r}, field {field!r}: {exc}") from exc
        assert first is not None
        return loaded, first

    def _seal(self, enc: EncryptedVector, like: SealedTensor, **params: Any) -> SealedTensor:
        return SealedTensor(
            chunks=tuple(enc.to_wire()),
            length=enc.length,
            shape=enc.shape,
            scheme="ckks",
            dtype=like.dtype,
            params=params,
        )

    def sum(self, replies: Sequence[Message], field: str) -> SealedTensor:
        """Encrypted element-wise sum of field ``field`` over the replies."""
        vectors, like = self._load(replies, field)
        total = vectors[0]
        for vec in vectors[1:]:
            total += vec
        return self._seal(total, like, **_contributors(replies))

    def mean(self, replies: Sequence[Message], field: str) -> SealedTensor:
        """Encrypted unweighted mean: the sum times the plaintext ``1/n``."""
        vectors, like = self._load(replies, field)
        total = vectors[0]
        for vec in vectors[1:]:
            total += vec
        return self._seal(total * (1.0 / len(vectors)), like, **_contributors(replies))

    def weighted_mean(self, replies: Sequence[Message], field: str, weights: Weights) -> SealedTensor:
        """Encrypted weighted mean with public weights.

        Each ciphertext is multiplied by its normalised plaintext weight
        ``w_k / sum(w)``, then the products are summed.

        Parameters
        ----------
        weights
            One weight per reply, aligned with ``replies``, or a mapping
            ``sender -> weight``. Weights are public, finite and ``>= 0``.
        """
        norm = _normalised_weights(replies, weights)
        vectors, like = self._load(replies, field)
        total = vectors[0] * norm[0]
        for vec, w in zip(vectors[1:], norm[1:], strict=True):
            total += vec * w
        return self._seal(total, like, **_contributors(replies))

    def scale(self, sealed: SealedTensor, factor: float | np.ndarray | torch.Tensor) -> SealedTensor:
        """Multiply a sealed sum by a public plaintext (e.g. a per-element ``1 / count``).

        Only valid on a value that has not been rescaled yet (a :meth:`sum`).
        """
        enc = EncryptedVector.from_wire(self.ctx, sealed.chunks, sealed.length, sealed.shape)
        return self._seal(enc * factor, sealed, **dict(sealed.params))
