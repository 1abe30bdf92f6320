"""Accountants: compose a list of privacy events into ε(δ).

An accountant here is *stateless over events*: ``epsilon(events, delta=...)``
composes exactly the events it is given, nothing more. State (what was spent)
lives in the :class:`~securefl.privacy.ledger.Ledger`, which owns one accountant
for the whole run; results are memoised by the full canonical event list, which
cannot change an answer. That removes, by construction, the bug where a fresh
accountant per round silently resets ε.

Every accountant says what it ``supports`` and refuses the rest with
:class:`~securefl.privacy.errors.UnsupportedEvent` (dp-accounting's habit), so an
event is never accounted under an analysis that does not cover it.

Implementations
---------------
``rdp``
    Rényi DP of the subsampled Gaussian (Mironov 2017; Mironov, Talwar & Zhang
    2019) with Opacus's analysis functions; a sound but loose upper bound. The default.
``pld``
    Privacy loss distributions with Google's dp-accounting (Koskela et al. 2020;
    Doroshenko et al., "Connect the Dots", PETS 2022); numerically tight
    (pessimistic rounding keeps it an upper bound).
``prv``
    Privacy random variables with Opacus's PRV accountant (Gopi, Lee & Wutschitz,
    "Numerical Composition of Differential Privacy", NeurIPS 2021); numerically
    tight, returns the upper end of its error interval.

Units and relations
-------------------
ε of different units of privacy (record, participant) are different promises
and are never composed together: :meth:`Accountant.epsilon` refuses a mixed
list, :meth:`Accountant.epsilon_by_unit` splits it. Within one unit all events
must share one neighbouring relation, because a guarantee is stated for one
relation; composing an add/remove guarantee with a replace-one guarantee would
state neither.
"""

from __future__ import annotations

import abc
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import ClassVar

import numpy as np

from securefl.privacy.analysis.conversions import dp_accounting_noise_multiplier
from securefl.privacy.analysis.rdp import DEFAULT_ORDERS, rdp_gaussian, rdp_to_epsilon
from securefl.privacy.errors import UnsupportedEvent
from securefl.privacy.events import AnyEvent, PrivacyEvent, PublicDataEvent

# One composable block: (noise_multiplier, sample_rate, total_steps).
Group = tuple[float, float, int]

# A memo of results, shared by all accountant instances: ε is a pure function of
# (accountant, parameters, relation, canonical events, δ), so memoising it can
# never change an answer — in particular it can never "forget" a spend the way
# a per-round accountant does. It makes a ledger's check-then-commit (which
# asks the same question twice) and the audit's recomputations cheap.
_MEMO: OrderedDict[tuple[object, ...], float] = OrderedDict()
_MEMO_SIZE = 2048
_MEMO_LOCK = threading.Lock()


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


class Accountant(abc.ABC):
    """Interface of every accountant.

    Attributes
    ----------
    name : str
        Registry name, recorded in ledgers (``"rdp"``, ``"pld"``, ``"prv"``).
    tight : bool
        ``True`` if ε is numerically tight (within discretisation error of the
        true ε, from above); ``False`` if it is a looser analytic upper bound.
        The audit uses this to compare accountants in a principled direction.
    description : str
        One line for reports.
    """

    name: ClassVar[str]
    tight: ClassVar[bool]
    description: ClassVar[str]

    def _parameters(self) -> tuple[object, ...]:
        """Everything besides the events that changes this accountant's answers (for the memo)."""
        return ()

    # ------------------------------------------------------------------ support
    def unsupported_reason(self, event: AnyEvent) -> str | None:
        """Why this accountant cannot account ``event`` soundly, or ``None`` if it can."""
        if isinstance(event, PublicDataEvent):
            return None
        if not isinstance(event, PrivacyEvent):
            return f"not a privacy event: {type(event).__name__}"
        return self._unsupported_reason(event)

    def supports(self, event: AnyEvent) -> bool:
        """Whether ``event`` can be composed soundly by this accountant."""
        return self.unsupported_reason(event) is None

    @abc.abstractmethod
    def _unsupported_reason(self, event: PrivacyEvent) -> str | None: ...

    # -------------------------------------------------------------- composition
    def epsilon(self, events: Iterable[AnyEvent], *, delta: float) -> float:
        """ε at ``delta`` of the composition of all ``events`` (all of one unit).

        Public-data events spend nothing and are skipped. An empty list gives 0.

        Raises
        ------
        UnsupportedEvent
            If an event is not supported, or the events mix neighbouring relations.
        ValueError
            If the events mix units (use :meth:`epsilon_by_unit`) or ``delta`` is
            not in (0, 1).
        """
        delta = _check_delta(delta)
        private = self._private_events(events)
        if not private:
            return 0.0
        units = sorted({e.unit for e in private})
        if len(units) > 1:
            raise ValueError(
                f"events mix units of privacy {units}; ε of different units are separate promises: use epsilon_by_unit()"
            )
        return self._epsilon_of(private, delta)

    def epsilon_by_unit(self, events: Iterable[AnyEvent], *, delta: float) -> dict[str, float]:
        """ε at ``delta`` for each unit of privacy present in ``events``, accounted separately."""
        delta = _check_delta(delta)
        by_unit: dict[str, list[PrivacyEvent]] = {}
        for event in self._private_events(events):
            by_unit.setdefault(event.unit, []).append(event)
        return {unit: self._epsilon_of(evs, delta) for unit, evs in sorted(by_unit.items())}

    def _private_events(self, events: Iterable[AnyEvent]) -> list[PrivacyEvent]:
        private: list[PrivacyEvent] = []
        for event in events:
            reason = self.unsupported_reason(event)
            if reason is not None:
                raise UnsupportedEvent(f"{self.name} accountant cannot account {event!r}: {reason}")
            if isinstance(event, PrivacyEvent):
                private.append(event)
        return private

    def _epsilon_of(self, events: Sequence[PrivacyEvent], delta: float) -> float:
        relations = sorted({e.relation for e in events})
        if len(relations) > 1:
            raise UnsupportedEvent(
                f"events of unit {events[0].unit!r} mix neighbouring relations {relations}; "
                "a guarantee holds for one relation, so use one relation per unit"
            )
        # Composition is commutative, so group identical (σ, q) blocks and sort:
        # the answer then depends only on the multiset of events, which makes a
        # ledger's running ε reproducible by the audit bit for bit, and makes
        # numerical accountants much faster (one self-composition per block).
        totals: dict[tuple[float, float], int] = {}
        for e in events:
            block = (e.noise_multiplier, e.sample_rate)
            totals[block] = totals.get(block, 0) + e.steps
        groups: tuple[Group, ...] = tuple((s, q, n) for (s, q), n in sorted(totals.items()))
        key: tuple[object, ...] = (type(self), self._parameters(), relations[0], groups, delta)
        with _MEMO_LOCK:
            cached = _MEMO.get(key)
            if cached is not None:
                _MEMO.move_to_end(key)
                return cached
        eps = float(self._compose(groups, relation=relations[0], delta=delta))
        if math.isnan(eps):
            eps = math.inf  # never let a NaN compare as "within budget"
        with _MEMO_LOCK:
            _MEMO[key] = eps
            if len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
        return eps

    @abc.abstractmethod
    def _compose(self, groups: tuple[Group, ...], *, relation: str, delta: float) -> float: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RdpAccountant(Accountant):
    """Rényi-DP accountant (Opacus analysis; Mironov 2017; Mironov, Talwar & Zhang 2019)."""

    name = "rdp"
    tight = False
    description = "RDP of the subsampled Gaussian (Opacus analysis; Mironov 2017), Balle et al. 2020 conversion"

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self.orders: tuple[float, ...] = tuple(float(a) for a in orders)

    def _parameters(self) -> tuple[object, ...]:
        return self.orders

    def _unsupported_reason(self, event: PrivacyEvent) -> str | None:
        if event.subsampled and event.relation == "replace_one":
            # The Sampled Gaussian Mechanism bound of Mironov, Talwar & Zhang (2019),
            # which Opacus implements, is proven for add/remove neighbours under
            # Poisson sampling only. Replace-one would need group privacy over two
            # add/remove steps, which RDP only gives through a lossy weak triangle
            # inequality that we do not implement; refusing is the sound choice.
            # (Use the PLD accountant, which has an exact replace-one analysis.)
            return "Poisson-subsampled Gaussian under replace_one has no RDP analysis here; use 'pld'"
        return None

    def _compose(self, groups: tuple[Group, ...], *, relation: str, delta: float) -> float:
        # For a plain Gaussian the relation does not matter: sensitivity is
        # already that of the event's relation, and RDP is α / (2σ²) either way.
        total = np.zeros(len(self.orders))
        for sigma, q, steps in groups:
            total = total + rdp_gaussian(noise_multiplier=sigma, sample_rate=q, steps=steps, orders=self.orders)
        eps, _ = rdp_to_epsilon(orders=self.orders, rdp=total, delta=delta)
        return eps


class PldAccountant(Accountant):
    """Privacy-loss-distribution accountant (Google dp-accounting ``PLDAccountant``)."""

    name = "pld"
    tight = True
    description = "privacy loss distributions (dp-accounting PLDAccountant, pessimistic estimate)"

    #: dp-accounting's default; finer is slower, coarser is looser (never unsound).
    VALUE_DISCRETIZATION_INTERVAL: ClassVar[float] = 1e-4

    def _parameters(self) -> tuple[object, ...]:
        return (self.VALUE_DISCRETIZATION_INTERVAL,)

    def _unsupported_reason(self, event: PrivacyEvent) -> str | None:
        return None  # Gaussian and Poisson-subsampled Gaussian, both relations.

    def _compose(self, groups: tuple[Group, ...], *, relation: str, delta: float) -> float:
        import dp_accounting
        from dp_accounting import dp_event
        from dp_accounting.pld import PLDAccountant

        neighbouring = (
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
            if relation == "add_remove"
            else dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        accountant = PLDAccountant(
            neighboring_relation=neighbouring,
            value_discretization_interval=self.VALUE_DISCRETIZATION_INTERVAL,
        )
        for sigma, q, steps in groups:
            gaussian = dp_event.GaussianDpEvent(
                noise_multiplier=dp_accounting_noise_multiplier(noise_multiplier=sigma, relation=relation)  # type: ignore[arg-type]
            )
            single: dp_event.DpEvent = (
                gaussian if q >= 1.0 else dp_event.PoissonSampledDpEvent(sampling_probability=q, event=gaussian)
            )
            accountant.compose(dp_event.SelfComposedDpEvent(event=single, count=steps))
        return float(accountant.get_epsilon(target_delta=delta))


class PrvAccountant(Accountant):
    """Privacy-random-variable accountant (Opacus ``PRVAccountant``; Gopi et al. 2021)."""

    name = "prv"
    tight = True
    description = "privacy random variables (Opacus PRVAccountant, upper end of eps_error=0.01)"

    EPS_ERROR: ClassVar[float] = 0.01

    def _parameters(self) -> tuple[object, ...]:
        return (self.EPS_ERROR,)

    def _unsupported_reason(self, event: PrivacyEvent) -> str | None:
        if event.subsampled and event.relation == "replace_one":
            # Opacus's PoissonSubsampledGaussianPRV is the add/remove privacy loss
            # of the subsampled Gaussian; it has no replace-one variant.
            return "Opacus PRV models the subsampled Gaussian under add_remove only, not replace_one; use 'pld'"
        return None

    def _compose(self, groups: tuple[Group, ...], *, relation: str, delta: float) -> float:
        from opacus.accountants import PRVAccountant

        accountant = PRVAccountant()
        # Opacus's history is a list of (noise_multiplier, sample_rate, steps);
        # q = 1 is the plain Gaussian, valid under either relation by our convention.
        accountant.history = [(sigma, q, steps) for sigma, q, steps in groups]
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # log(1 − q) = −inf at q = 1 is intended by Opacus's formulas.
            warnings.simplefilter("ignore")
            return float(accountant.get_epsilon(delta=delta, eps_error=self.EPS_ERROR))


_REGISTRY: dict[str, type[Accountant]] = {
    RdpAccountant.name: RdpAccountant,
    PldAccountant.name: PldAccountant,
    PrvAccountant.name: PrvAccountant,
}

#: Registry names, in the order reports list them.
ACCOUNTANT_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_accountant(name: str) -> Accountant:
    """Return a new accountant by registry name (``"rdp"``, ``"pld"`` or ``"prv"``).

    Only the ledger, the calibration and the audit should call this: anything
    that reports ε must go through a participant's ledger.
    """
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(repr(n) for n in ACCOUNTANT_NAMES)}") from None
    return cls()
