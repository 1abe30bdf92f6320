"""The minimum cohort: the fewest contributors any aggregate of a round may hold.

One number ``t`` ties three promises together, so they can never disagree:

- pairwise masking's Shamir threshold (a participant reveals no unmasking share for fewer survivors);
- CKKS opening (a participant decrypts no aggregate that names fewer contributors);
- distributed DP's booking (the ledgers book the noise of the shares that at least ``t`` contributors put in
  the sum, and the server refuses to aggregate fewer).

``n``, the number of participants sampled per round, comes from the approved config (participation × number
of participants), never from the coordinator's list of who was sampled: a coordinator that lists more
participants than that would shrink every distributed-noise share, and one that lists fewer than ``t`` asks
for an aggregate below the cohort. A round's list may be shorter than ``n`` only when participants stopped
(budget spent), and never shorter than ``t``.

Limit (issue 19, finding 14): under CKKS all owners share one secret key, so the contributor list an aggregate
carries is the coordinator's word, signed by it but not provable; a participant's check holds against an
honest-but-curious coordinator or a bug (e.g. a catch-up log), not against one that forges the list. Masking
enforces ``t`` cryptographically: fewer than ``t`` survivors cannot reconstruct the masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The fewest contributors of any aggregate, whatever the config: a "sum" of one is that owner's payload.
MIN_AGGREGATE = 2


def participants_per_round(participation: float, n_participants: int) -> int:
    """``n``: how many participants a round samples (the runtime's rule, from the config alone)."""
    return max(1, int(round(participation * n_participants)))


def min_cohort(n: int, *, fraction: float) -> int:
    """``t`` for a round of ``n``: ``max(ceil(fraction·n), n//2 + 1)``, at most ``n``.

    The strict majority is SecAgg's condition (``t > n/2``) for its argument against a server that lies about
    who dropped out; DP and CKKS use the same ``t`` so that one number is booked and enforced. ``fraction·n`` is
    rounded to 9 decimals before the ceiling, so that 0.7·10 (7.000000000000001 in floating point) gives 7.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (participants per round) must be an integer >= 1, got {n!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return min(n, max(math.ceil(round(fraction * n, 9)), n // 2 + 1))


@dataclass(frozen=True)
class Cohort:
    """A run's cohort: ``per_round`` participants sampled a round, aggregates of at least ``minimum``.

    ``participants``: every participant id of the run (empty: not checked).
    """

    per_round: int
    minimum: int
    participants: tuple[str, ...] = ()

    @classmethod
    def plan(cls, *, per_round: int, fraction: float, participants: Sequence[str] = ()) -> Cohort:
        return cls(per_round=per_round, minimum=min_cohort(per_round, fraction=fraction),
                   participants=tuple(participants))

    def check_sampled(self, sampled: Sequence[str]) -> None:
        """ValueError unless ``sampled`` can be a round of this run (no more than ``per_round``, no fewer than
        ``minimum``, no repeats, no strangers)."""
        ids = list(sampled)
        if len(ids) > self.per_round:
            raise ValueError(f"the round's sampled list names {len(ids)} participants, but the approved config "
                             f"samples {self.per_round} per round (run.participation × participants); refusing")
        if len(ids) < self.minimum:
            raise ValueError(f"the round's sampled list names {len(ids)} participants, fewer than the minimum "
                             f"cohort t = {self.minimum} of {self.per_round}; refusing (an aggregate of fewer "
                             "than t contributors is never opened)")
        self._check_ids(ids, "sampled list")

    def check_contributors(self, contributors: Any, *, what: str) -> list[str]:
        """``contributors`` (an aggregate's list), or ValueError unless it names at least ``minimum`` distinct
        participants of the run."""
        if not isinstance(contributors, list | tuple) or not all(isinstance(c, str) for c in contributors):
            raise ValueError(f"{what} names no contributors (got {contributors!r:.80}); refusing to open an "
                             "aggregate whose contributors are unknown")
        if len(contributors) < max(self.minimum, MIN_AGGREGATE):
            raise ValueError(f"{what} holds {len(contributors)} contributor(s) {list(contributors)!r:.120}, fewer "
                             f"than the minimum cohort t = {max(self.minimum, MIN_AGGREGATE)}; refusing to open it")
        self._check_ids(list(contributors), f"{what}'s contributor list")
        return list(contributors)

    def _check_ids(self, ids: list[str], what: str) -> None:
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"the {what} repeats {repeated!r:.120}; each participant counts once")
        strangers = sorted(set(ids) - set(self.participants)) if self.participants else []
        if strangers:
            raise ValueError(f"the {what} names {strangers!r:.120}, who are not participants of this run")


#: Without a planned cohort (a layer built by hand): only the absolute floor applies.
UNPLANNED = Cohort(per_round=0, minimum=MIN_AGGREGATE)
