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

from securefl.core.lazy import lazy_attributes

# Loaded on first use (PEP 562): the config imports privacy.cohort, and must not pull in Opacus through this
# package's accountants.
_EXPORTS = {
    "ACCOUNTANT_NAMES": ".accountants",
    "Accountant": ".accountants",
    "AnyEvent": ".events",
    "AuditReport": ".audit",
    "AuditRow": ".audit",
    "Budget": ".budget",
    "BudgetExceeded": ".errors",
    "CalibrationError": ".errors",
    "ExperimentTarget": ".budget",
    "Ledger": ".ledger",
    "LedgerCorrupt": ".errors",
    "LedgerLocked": ".errors",
    "LedgerMismatch": ".errors",
    "PldAccountant": ".accountants",
    "PolicyError": ".errors",
    "PrivacyError": ".errors",
    "PrivacyEvent": ".events",
    "PrivacyPolicy": ".budget",
    "PrvAccountant": ".accountants",
    "PublicDataEvent": ".events",
    "RdpAccountant": ".accountants",
    "UnsupportedEvent": ".errors",
    "audit_ledger": ".audit",
    "audit_run": ".audit",
    "calibrate_noise_multiplier": ".calibration",
    "clip_and_noise": ".mechanisms",
    "distributed_event": ".mechanisms",
    "distributed_noise_share": ".mechanisms",
    "effective_noise_multiplier": ".mechanisms",
    "gaussian_histogram": ".mechanisms",
    "get_accountant": ".accountants",
    "planned_event": ".calibration",
    "read_ledger": ".ledger",
    "resolve_budget": ".budget",
    "top_up_std": ".mechanisms",
}


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


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, __all__)
