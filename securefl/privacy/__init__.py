"""Privacy for securefl: mechanisms, events, accountants, calibration, ledgers and audit.

The layout follows Opacus's split between pure analysis and stateful objects:

- :mod:`~securefl.privacy.events`: frozen privacy events (what a release cost).
- :mod:`~securefl.privacy.analysis`: pure math (RDP, exact Gaussian, conversions).
- :mod:`~securefl.privacy.accountants`: RDP (default), PLD and PRV accountants,
  stateless over a list of events.
- :mod:`~securefl.privacy.calibration`: σ from an (ε, δ) target, by binary search
  over the reporting accountant.
- :mod:`~securefl.privacy.mechanisms`: Gaussian mechanisms returning
  ``(noised, event)``; they never import the ledger.
- :mod:`~securefl.privacy.ledger`: one append-only, hash-chained, signed ledger
  per data owner for the whole run (check, then commit; write-ahead).
- :mod:`~securefl.privacy.budget`: the owner's policy against the experiment's target.
- :mod:`~securefl.privacy.audit`: re-verify ledgers and recompute ε independently.

See ``spec/privacy.md`` for the privacy model these modules implement.
"""

from securefl.privacy.accountants import (
    ACCOUNTANT_NAMES,
    Accountant,
    PldAccountant,
    PrvAccountant,
    RdpAccountant,
    get_accountant,
)
from securefl.privacy.audit import AuditReport, AuditRow, audit_ledger, audit_run
from securefl.privacy.budget import Budget, ExperimentTarget, PrivacyPolicy, resolve_budget
from securefl.privacy.calibration import calibrate_noise_multiplier, planned_event
from securefl.privacy.errors import (
    BudgetExceeded,
    CalibrationError,
    LedgerCorrupt,
    LedgerLocked,
    LedgerMismatch,
    PolicyError,
    PrivacyError,
    UnsupportedEvent,
)
from securefl.privacy.events import AnyEvent, PrivacyEvent, PublicDataEvent
from securefl.privacy.ledger import Ledger, read_ledger
from securefl.privacy.mechanisms import (
    clip_and_noise,
    distributed_event,
    distributed_noise_share,
    effective_noise_multiplier,
    gaussian_histogram,
    top_up_std,
)

__all__ = [
    "ACCOUNTANT_NAMES",
    "Accountant",
    "AnyEvent",
    "AuditReport",
    "AuditRow",
    "Budget",
    "BudgetExceeded",
    "CalibrationError",
    "ExperimentTarget",
    "Ledger",
    "LedgerCorrupt",
    "LedgerLocked",
    "LedgerMismatch",
    "PldAccountant",
    "PolicyError",
    "PrivacyError",
    "PrivacyEvent",
    "PrivacyPolicy",
    "PrvAccountant",
    "PublicDataEvent",
    "RdpAccountant",
    "UnsupportedEvent",
    "audit_ledger",
    "audit_run",
    "calibrate_noise_multiplier",
    "clip_and_noise",
    "distributed_event",
    "distributed_noise_share",
    "effective_noise_multiplier",
    "gaussian_histogram",
    "get_accountant",
    "planned_event",
    "read_ledger",
    "resolve_budget",
    "top_up_std",
]
