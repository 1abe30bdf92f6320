"""Audit a run's privacy ledgers: integrity, signatures, and ε recomputed twice.

``audit_run(run_dir)`` reads every ``run_dir/ledgers/*.jsonl`` (and its ``.pub``)
and, for each participant and unit of privacy:

1. **Integrity.** Verifies the hash chain and every seal signature
   (:func:`securefl.privacy.ledger.read_ledger`), that ``<ledger>.pub`` holds the
   header's key, and optionally pinned keys and final heads supplied by the
   caller (the only defence against rolling a ledger back to an earlier seal).
2. **Same-accountant recomputation.** Recomputes every entry's running ε from
   the logged events with the accountant the ledger reported with, which must
   match the recorded value to ``tolerance`` (relative, 1e-6 by default): the
   ledger composes canonically, so an honest ledger matches bit for bit, and an
   edited or mis-computed ε does not.
3. **Independent recomputation.** Recomputes the final ε with every *other*
   accountant that supports the events (PLD, then PRV, when RDP reported; RDP,
   then the other numerical one, when PLD or PRV reported) and checks it in
   the direction theory allows. RDP is a loose upper bound and PLD/PRV are
   numerically tight upper bounds, so for the true ε:
   ``true ≤ tight ≤ true + discretisation`` and ``true ≤ RDP``. Hence
   * loose reported, tight independent: require ``tight ≤ reported·(1+r) + a``
     (a larger tight ε means the reported bound under-counts);
   * tight reported, loose independent: require ``reported ≤ loose·(1+r) + a``
     (a tight value above a valid upper bound is a wrong analysis);
   * both tight: require ``|reported − independent| ≤ r·max + a``.
   ``r``/``a`` (``independent_rtol``/``independent_atol``) absorb the numerical
   accountants' discretisation error (PRV's ``eps_error`` is 0.01).
4. **Budget.** The recomputed ε must not exceed the unit's budget in the header.
5. **Seal.** The last entry must be a seal, else the run is ``unsealed``.
6. **Presence.** Every participant that ``run_dir/config.yaml`` puts under DP
   must have a ledger; a missing file is ``tampered``.

Statuses, worst first: ``tampered`` > ``mismatch`` > ``over_budget`` >
``unsealed`` > ``ok``. :attr:`AuditReport.ok` is true only if there is at least
one ledger and every row is ``ok``; ``securefl audit`` exits non-zero otherwise.

This is the *accounting* audit. The empirical audit (a canary /
membership-inference lower bound on ε, after Steinke, Nasr & Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023) checks the mechanism itself
and lives with the attacks.

References
----------
Mironov 2017 (RDP); Gopi et al. 2021 (PRV, via Opacus); Doroshenko et al. 2022
and Google dp-accounting (PLD); Steinke, Nasr & Jagielski 2023.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from securefl.privacy.accountants import Accountant, get_accountant
from securefl.privacy.errors import LedgerCorrupt, UnsupportedEvent
from securefl.privacy.events import PrivacyEvent
from securefl.privacy.ledger import LedgerContents, public_key_path, read_ledger

Status = Literal["ok", "tampered", "mismatch", "over_budget", "unsealed"]
_RANK: dict[str, int] = {"ok": 0, "unsealed": 1, "over_budget": 2, "mismatch": 3, "tampered": 4}

#: Independent accountants to try, in order of preference, for each reporting accountant.
INDEPENDENT_OF: dict[str, tuple[str, ...]] = {"rdp": ("pld", "prv"), "pld": ("rdp", "prv"), "prv": ("rdp", "pld")}


class AuditRow(BaseModel):
    """One participant × unit of privacy in an audit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    participant: str
    unit: str | None
    relation: str | None = None
    target: float | None
    epsilon_reported: float | None
    epsilon_recomputed: float | None
    epsilon_independent: float | None
    independent_accountant: str | None
    accountant: str | None
    delta: float | None
    status: Status
    reasons: tuple[str, ...] = ()
    file: str


class AuditReport(BaseModel):
    """The result of :func:`audit_run`; render it with :meth:`format_table` or :meth:`to_markdown`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str
    rows: tuple[AuditRow, ...]
    notes: tuple[str, ...] = ()
    tolerance: float
    independent_rtol: float
    independent_atol: float

    @property
    def ok(self) -> bool:
        """True iff at least one ledger was audited and every row is ``ok``."""
        return bool(self.rows) and all(r.status == "ok" for r in self.rows)

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        data["ok"] = self.ok
        return json.dumps(data, indent=2, sort_keys=True)

    def _table(self) -> tuple[list[str], list[list[str]]]:
        head = ["participant", "unit", "target", "ε reported", "ε recomputed (independent)", "δ", "status"]
        body = []
        for r in self.rows:
            indep = "-" if r.epsilon_independent is None else f"{_fmt(r.epsilon_independent)} ({r.independent_accountant})"
            reported = "-" if r.epsilon_reported is None else f"{_fmt(r.epsilon_reported)} ({r.accountant})"
            body.append(
                [
                    r.participant,
                    (r.unit or "-") + (f" ({r.relation})" if r.relation else ""),
                    _fmt(r.target),
                    reported,
                    indep,
                    "-" if r.delta is None else f"{r.delta:g}",
                    r.status,
                ]
            )
        return head, body

    def _reasons(self) -> list[str]:
        return [f"{r.participant} [{r.unit or '-'}] {r.status}: {why}" for r in self.rows for why in r.reasons]

    def format_table(self) -> str:
        """Plain-text table for a terminal, followed by the reasons for every non-ok status."""
        head, body = self._table()
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        out = [f"privacy audit of {self.run_dir}", line(head), line(["-" * w for w in widths])]
        out += [line(row) for row in body]
        out += [""] + self._reasons() + list(self.notes)
        out.append(f"result: {'OK' if self.ok else 'FAILED'}")
        return "\n".join(out).rstrip() + "\n"

    def to_markdown(self) -> str:
        """Markdown section for the run report."""
        head, body = self._table()
        out = [f"## Privacy audit: `{self.run_dir}`", "", f"**Result: {'OK' if self.ok else 'FAILED'}**", ""]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" for _ in head) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        reasons = self._reasons()
        if reasons or self.notes:
            out += ["", *[f"- {r}" for r in reasons], *[f"- {n}" for n in self.notes]]
        out += [
            "",
            f"Same-accountant recomputation must match to a relative {self.tolerance:g}. The independent "
            "accountant is checked in the direction theory allows (RDP is a loose upper bound; PLD/PRV are "
            f"tight): relative {self.independent_rtol:g}, absolute {self.independent_atol:g}.",
        ]
        return "\n".join(out) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}"


def _consistent(
    reported: Accountant,
    eps_reported: float,
    independent: Accountant,
    eps_independent: float,
    *,
    rtol: float,
    atol: float,
) -> bool:
    """Whether two accountants' ε agree in the direction theory allows (see module docstring)."""
    if math.isinf(eps_reported):
        return True  # an infinite reported spend cannot under-count anything
    if math.isinf(eps_independent):
        # A vacuous RDP bound says nothing; a tight accountant finding ∞ where the
        # reported one is finite means the reported one under-counts.
        return not independent.tight
    if not reported.tight and independent.tight:
        return eps_independent <= eps_reported * (1 + rtol) + atol
    if reported.tight and not independent.tight:
        return eps_reported <= eps_independent * (1 + rtol) + atol
    return abs(eps_reported - eps_independent) <= rtol * max(eps_reported, eps_independent) + atol


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12) or (math.isinf(a) and math.isinf(b))


def audit_ledger(
    path: str | Path,
    *,
    tolerance: float = 1e-6,
    independent_rtol: float = 0.01,
    independent_atol: float = 0.02,
    public_key: str | None = None,
    expected_head: str | None = None,
    full_recheck: bool = True,
) -> list[AuditRow]:
    """Audit one ledger file; see the module docstring for what is checked.

    Parameters
    ----------
    path : str or Path
        The ledger file.
    tolerance : float
        Relative tolerance of the same-accountant recomputation.
    independent_rtol, independent_atol : float
        Tolerances of the independent-accountant check.
    public_key : str, optional
        Pinned hex public key the ledger must carry.
    expected_head : str, optional
        Pinned final chain head (hash of the last entry), recorded elsewhere.
    full_recheck : bool
        Recompute the running ε of every entry (default) or only the final ones
        (faster for long PLD/PRV ledgers; the chain and seal still cover the rest).
    """
    path = Path(path)
    try:
        contents = read_ledger(path)
    except (LedgerCorrupt, OSError) as exc:
        return [_file_row(path, "tampered", str(exc))]

    header = contents.header
    participant = header["participant"]
    file_reasons: list[str] = []
    tampered = False
    pub = public_key_path(path)
    try:
        pub_hex = pub.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        pub_hex = None
    if pub_hex is None:
        tampered = True
        file_reasons.append(f"public key file {pub.name} is missing or unreadable")
    elif pub_hex != header["public_key"]:
        tampered = True
        file_reasons.append(f"public key file {pub.name} does not match the ledger header's key")
    if public_key is not None and public_key != header["public_key"]:
        tampered = True
        file_reasons.append("ledger key differs from the pinned public key for this participant")
    if expected_head is not None and expected_head != contents.head:
        tampered = True
        file_reasons.append(
            f"chain head {contents.head[:16]}… differs from the recorded head {expected_head[:16]}… (rolled back or extended)"
        )

    reported_acc = get_accountant(header["accountant"])
    delta = float(header["delta"])
    mismatch_any: list[str] = []

    recomputed, last_recorded = _recheck_running_epsilon(
        contents, reported_acc, delta=delta, rtol=tolerance, full=full_recheck, problems=mismatch_any
    )

    units: list[str | None] = [u for u in sorted({e.unit for e in contents.events if isinstance(e, PrivacyEvent)})]
    rows: list[AuditRow] = []
    for unit in units or [None]:
        reasons = list(file_reasons) + list(mismatch_any)
        status = "tampered" if tampered else ("mismatch" if mismatch_any else "ok")
        target = None
        eps_reported = eps_recomputed = eps_indep = None
        indep_name = None
        relation = None
        if unit is not None:
            target = float(header["unit_budgets"].get(unit, header["max_epsilon"]))
            eps_reported = last_recorded.get(unit)
            eps_recomputed = recomputed.get(unit)
            unit_events = [e for e in contents.events if isinstance(e, PrivacyEvent) and e.unit == unit]
            relation = ",".join(sorted({e.relation for e in unit_events}))
            if eps_recomputed is not None:
                eps_indep, indep_name, problems, notes = _independent_check(
                    reported_acc,
                    eps_recomputed,
                    unit_events,
                    delta=delta,
                    rtol=independent_rtol,
                    atol=independent_atol,
                )
                reasons += notes
                if problems:
                    reasons += problems
                    status = _worst(status, "mismatch")
                if eps_recomputed > target or (eps_reported is not None and eps_reported > target):
                    reasons.append(f"{unit}-level ε={max(eps_recomputed, eps_reported or 0):.6g} exceeds the budget {target:g}")
                    status = _worst(status, "over_budget")
        else:
            target = float(header["max_epsilon"])
            eps_reported = eps_recomputed = 0.0
        if not contents.sealed:
            reasons.append("last entry is not a seal (the run did not finish, or its seal was removed)")
            status = _worst(status, "unsealed")
        rows.append(
            AuditRow(
                participant=participant,
                unit=unit,
                relation=relation,
                target=target,
                epsilon_reported=eps_reported,
                epsilon_recomputed=eps_recomputed,
                epsilon_independent=eps_indep,
                independent_accountant=indep_name,
                accountant=reported_acc.name,
                delta=delta,
                status=status,  # type: ignore[arg-type]
                reasons=tuple(reasons),
                file=str(path),
            )
        )
    return rows


def _private_participants(run_dir: Path) -> list[tuple[str, str]]:
    """(id, unit) of every participant the run's saved config puts under DP; none without a readable config."""
    import yaml

    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return []
    if not isinstance(raw, dict) or not isinstance(raw.get("privacy"), dict):
        return []
    unit = raw["privacy"].get("unit", "none")
    participants = raw.get("participants")
    if unit == "none" or not isinstance(participants, list):
        return []
    ids = [str(p["id"]) for p in participants if isinstance(p, dict) and "id" in p]
    try:
        # A participant's own node directory (securefl.deploy) holds only its own ledger.
        hosted = json.loads((run_dir / "run.json").read_text()).get("participant")
    except (OSError, ValueError, AttributeError):
        hosted = None
    if isinstance(hosted, str):
        ids = [i for i in ids if i == hosted]
    return [(i, str(unit)) for i in ids]


def _worst(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


def _file_row(path: Path, status: Status, reason: str) -> AuditRow:
    return AuditRow(
        participant=path.name.removesuffix(".jsonl"),
        unit=None,
        target=None,
        epsilon_reported=None,
        epsilon_recomputed=None,
        epsilon_independent=None,
        independent_accountant=None,
        accountant=None,
        delta=None,
        status=status,
        reasons=(reason,),
        file=str(path),
    )


def _recheck_running_epsilon(
    contents: LedgerContents,
    accountant: Accountant,
    *,
    delta: float,
    rtol: float,
    full: bool,
    problems: list[str],
) -> tuple[dict[str, float], dict[str, float]]:
    """Recompute every (or the final) running ε; return (final recomputed, final recorded) by unit."""
    entries = contents.entries
    events_so_far: list[Any] = []
    event_iter = iter(contents.events)
    # Which lines to recompute: all, or only the last one (a seal or release
    # carries the final running ε either way).
    last_index = len(entries) - 1
    recorded_final: dict[str, float] = {}
    previous: dict[str, float] = {}
    recomputed: dict[str, float] = {}
    for index, entry in enumerate(entries):
        if entry["kind"] == "header":
            continue
        lineno = index + 1
        if entry["kind"] == "release":
            events_so_far.append(next(event_iter))
        recorded = {u: float(v) for u, v in entry["epsilon_by_unit"].items()}
        for unit, value in recorded.items():
            if value < previous.get(unit, 0.0):
                problems.append(f"line {lineno}: {unit}-level ε decreased from {previous[unit]:.6g} to {value:.6g}")
        if set(previous) - set(recorded):
            problems.append(f"line {lineno}: units {sorted(set(previous) - set(recorded))} vanished from epsilon_by_unit")
        previous = recorded
        recorded_final = recorded
        if not full and index != last_index:
            continue
        try:
            recomputed = accountant.epsilon_by_unit(events_so_far, delta=delta)
        except (UnsupportedEvent, ValueError) as exc:
            problems.append(f"line {lineno}: the reporting accountant {accountant.name!r} cannot recompute: {exc}")
            return {}, recorded_final
        if set(recomputed) != set(recorded) or not all(_close(recorded[u], recomputed[u], rtol) for u in recomputed):
            problems.append(
                f"line {lineno}: recorded epsilon_by_unit {_fmt_map(recorded)} but {accountant.name} "
                f"recomputes {_fmt_map(recomputed)} from the logged events"
            )
        if entry["kind"] == "release" and entry["mechanism"] != "none":
            unit = entry["unit"]
            if not _close(float(entry["epsilon_after"]), recomputed.get(unit, 0.0), rtol):
                problems.append(
                    f"line {lineno}: epsilon_after {entry['epsilon_after']:.10g} but {accountant.name} "
                    f"recomputes {recomputed.get(unit, 0.0):.10g}"
                )
    # The last entry was always recomputed above, so `recomputed` is the final ε.
    return recomputed, recorded_final


def _fmt_map(values: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{u}: {v:.10g}" for u, v in sorted(values.items())) + "}"


def _independent_check(
    reported: Accountant,
    eps_reported: float,
    events: list[PrivacyEvent],
    *,
    delta: float,
    rtol: float,
    atol: float,
) -> tuple[float | None, str | None, list[str], list[str]]:
    """Recompute with every other supporting accountant: (shown ε, its name, problems, notes)."""
    shown: tuple[float | None, str | None] = (None, None)
    problems: list[str] = []
    for name in INDEPENDENT_OF[reported.name]:
        other = get_accountant(name)
        if not all(other.supports(e) for e in events):
            continue
        eps_other = other.epsilon(events, delta=delta)
        if shown[1] is None:
            shown = (eps_other, name)
        if not _consistent(reported, eps_reported, other, eps_other, rtol=rtol, atol=atol):
            problems.append(
                f"independent {name} ε={eps_other:.6g} is inconsistent with reported {reported.name} "
                f"ε={eps_reported:.6g} ({'tight' if other.tight else 'upper bound'} vs "
                f"{'tight' if reported.tight else 'upper bound'}; rtol {rtol:g}, atol {atol:g})"
            )
    if shown[1] is None:
        # Not a failure: only the reporting accountant has a sound analysis of
        # these events (e.g. subsampled replace-one, PLD only); say so.
        return (
            None,
            None,
            problems,
            ["note: no independent accountant supports these events; only the reporting accountant was used"],
        )
    return shown[0], shown[1], problems, []


def audit_run(
    run_dir: str | Path,
    *,
    tolerance: float = 1e-6,
    independent_rtol: float = 0.01,
    independent_atol: float = 0.02,
    public_keys: Mapping[str, str] | None = None,
    expected_heads: Mapping[str, str] | None = None,
    full_recheck: bool = True,
) -> AuditReport:
    """Audit every ledger in ``run_dir/ledgers``.

    Parameters
    ----------
    run_dir : str or Path
        The run directory (ledgers are in ``run_dir/ledgers/*.jsonl``).
    tolerance : float
        Relative tolerance of the same-accountant recomputation (default 1e-6).
    independent_rtol, independent_atol : float
        Tolerances of the independent-accountant check (see module docstring).
    public_keys : mapping, optional
        Participant → pinned hex public key (e.g. from the run's key registry).
    expected_heads : mapping, optional
        Participant → final chain head recorded outside the ledger (detects a
        rollback to an earlier seal, which nothing inside the file can).
    full_recheck : bool
        Recompute every entry's running ε (default) or only the final values.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` has no ``ledgers`` directory.
    """
    for name, value in (("tolerance", tolerance), ("independent_rtol", independent_rtol), ("independent_atol", independent_atol)):
        if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    run_dir = Path(run_dir)
    ledger_dir = run_dir / "ledgers"
    if not ledger_dir.is_dir():
        raise FileNotFoundError(f"{ledger_dir}: no ledgers directory in run {run_dir}")
    rows: list[AuditRow] = []
    notes: list[str] = []
    files = sorted(ledger_dir.glob("*.jsonl"))
    if not files:
        notes.append(f"no ledger files (*.jsonl) in {ledger_dir}: nothing was verified")
    for path in files:
        stem = path.name.removesuffix(".jsonl")
        rows.extend(
            audit_ledger(
                path,
                tolerance=tolerance,
                independent_rtol=independent_rtol,
                independent_atol=independent_atol,
                public_key=(public_keys or {}).get(stem),
                expected_head=(expected_heads or {}).get(stem),
                full_recheck=full_recheck,
            )
        )
    # A participant the run's config says was private must have a ledger: a deleted file is the
    # ultimate under-count.
    for pid, unit in _private_participants(run_dir):
        path = ledger_dir / f"{pid}.jsonl"
        if not path.exists():
            rows.append(_file_row(path, "tampered", f"ledger file is missing: {run_dir / 'config.yaml'} lists participant "
                                                    f"{pid!r} with privacy.unit {unit!r}"))
    # A participant must have exactly one ledger: two files for one participant
    # would let a run report the smaller spend.
    owners: dict[str, set[str]] = {}
    for row in rows:
        owners.setdefault(row.participant, set()).add(row.file)
    final: list[AuditRow] = []
    for row in rows:
        if len(owners[row.participant]) > 1:
            others = sorted(Path(f).name for f in owners[row.participant] if f != row.file)
            row = row.model_copy(
                update={
                    "status": "tampered",
                    "reasons": (*row.reasons, f"participant {row.participant!r} also has ledger(s) {others}"),
                }
            )
        final.append(row)
    return AuditReport(
        run_dir=str(run_dir),
        rows=tuple(final),
        notes=tuple(notes),
        tolerance=tolerance,
        independent_rtol=independent_rtol,
        independent_atol=independent_atol,
    )
