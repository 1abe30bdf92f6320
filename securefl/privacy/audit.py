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
7. **Pinned keys.** A seal proves only that *some* key sealed the chain, and
   whoever can write the run directory can re-seal it with a key of their own.
   So every ledger's key is pinned, by default, to a public key from outside
   the run directory: the caller's ``public_keys`` (``securefl audit --roster``),
   else the simulation's key store (``<keys>/<run id>/roster/<id>.pub``, see
   :mod:`securefl.crypto.keystore`). A ledger no outside key confirms is
   ``unpinned``: a failure, unless the caller allows it (``--allow-unpinned``),
   and then still flagged with a warning.
8. **Cross-check against what left.** The coordinator records every message a
   participant sent in ``releases.jsonl`` (before sending it), and each owner's
   calibrated σ and plan in ``privacy_plan.json`` (before round 1). Each ledger
   must cover them (else ``unbooked``, naming participant, round and kind):
   * participant level: every delivered release carrying a private field has a
     ledger entry of the same round and payload kind;
   * record level (releases are post-processing of DP-SGD): every delivered
     release comes after training booked in the ledger (or a public step);
   * every entry books the calibrated σ (≤ it for distributed noise, whose
     booked worst case is smaller), DP-SGD at a sampling rate no larger than
     planned, histograms at the planned σ; the ledger's δ is the planned one;
   * ``summary.json`` reports no more ε than the ledger holds.
   Without those files (a run made before they existed, or a node's directory,
   whose coordinator holds them) the audit says it could not cross-check; in
   a run directory whose config is private, a missing record is ``tampered``.
9. **δ.** δ ≥ 1/n, with n the participant's record count (from the plan; else
   the smallest n the DP-SGD sampling rates allow) or, at participant level,
   the number of participants, is ``over_budget``: such a δ allows releasing a
   record outright. So is a (tight, hence valid upper-bound) independent ε
   above the target, even when the reported one is under it.

Statuses, worst first: ``tampered`` > ``mismatch`` > ``unbooked`` >
``over_budget`` > ``unsealed`` > ``unpinned`` > ``ok``. :attr:`AuditReport.ok`
is true only if there is at least one ledger and every row is ``ok`` (or
``unpinned`` when allowed); ``securefl audit`` exits non-zero otherwise.

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

Status = Literal["ok", "tampered", "mismatch", "unbooked", "over_budget", "unsealed", "unpinned"]
_RANK: dict[str, int] = {"ok": 0, "unpinned": 1, "unsealed": 2, "over_budget": 3, "unbooked": 4, "mismatch": 5,
                         "tampered": 6}

#: Files the coordinator writes that the audit cross-checks the ledgers against (see securefl.runtime.federation).
RELEASES_FILE = "releases.jsonl"
PLAN_FILE = "privacy_plan.json"
#: Relative tolerance when comparing a booked σ with the calibrated one (both are the same float, written twice).
_SIGMA_RTOL = 1e-9

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
    #: Whether the ledger's key was checked against a public key from outside the run directory.
    pinned: bool = False


class AuditReport(BaseModel):
    """The result of :func:`audit_run`; render it with :meth:`format_table` or :meth:`to_markdown`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str
    rows: tuple[AuditRow, ...]
    notes: tuple[str, ...] = ()
    tolerance: float
    independent_rtol: float
    independent_atol: float
    allow_unpinned: bool = False

    @property
    def ok(self) -> bool:
        """True iff at least one ledger was audited and every row is ``ok`` (or ``unpinned``, if allowed)."""
        passing = {"ok", "unpinned"} if self.allow_unpinned else {"ok"}
        return bool(self.rows) and all(r.status in passing for r in self.rows)

    @property
    def unpinned(self) -> list[str]:
        """Participants whose ledger key no source outside the run directory confirmed."""
        return sorted({r.participant for r in self.rows if not r.pinned})

    def warnings(self) -> list[str]:
        if not self.unpinned:
            return []
        return [f"WARNING: UNPINNED ledger key(s) of {', '.join(self.unpinned)}: no public key from outside the run "
                "directory confirmed them (give --roster KEY_DIR, or --keys DIR of the simulation's key store), so "
                "anyone who could write the run directory could have re-sealed these ledgers"
                + (" (allowed by --allow-unpinned)" if self.allow_unpinned else "")]

    def _result(self) -> str:
        if not self.ok:
            return "FAILED"
        return "OK, but UNPINNED" if self.unpinned else "OK"

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        data["ok"] = self.ok
        data["unpinned"] = self.unpinned
        data["warnings"] = self.warnings()
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
                    "UNPINNED" if r.status == "unpinned" else r.status + ("" if r.pinned else ", UNPINNED"),
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

        out = [f"privacy audit of {self.run_dir}", *self.warnings(), line(head), line(["-" * w for w in widths])]
        out += [line(row) for row in body]
        out += [""] + self._reasons() + list(self.notes)
        out.append(f"result: {self._result()}")
        return "\n".join(out).rstrip() + "\n"

    def to_markdown(self) -> str:
        """Markdown section for the run report."""
        head, body = self._table()
        out = [f"## Privacy audit: `{self.run_dir}`", "", f"**Result: {self._result()}**", "",
               *[f"**{w}**\n" for w in self.warnings()]]
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
    records: int | None = None,
    participants: int | None = None,
) -> list[AuditRow]:
    """Audit one ledger file; see the module docstring for what is checked (1-5, and δ).

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
    records : int, optional
        The participant's record count, from a record outside the ledger (δ must be below 1/records).
    participants : int, optional
        The number of participants of the run (δ of a participant-level unit must be below its inverse).
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
        status: Status = "tampered" if tampered else ("mismatch" if mismatch_any else "ok")
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
                above = _tight_independent_above(reported_acc, unit_events, delta=delta, target=target)
                if above:
                    reasons.append(above)
                    status = _worst(status, "over_budget")
            too_large = _delta_too_large(delta, unit, unit_events, records=records, participants=participants)
            if too_large:
                reasons.append(too_large)
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


def _tight_independent_above(reported: Accountant, events: list[PrivacyEvent], *, delta: float,
                             target: float) -> str | None:
    """The reason, if a tight independent accountant (a valid upper bound, unlike a loose one whose excess says
    nothing) puts ε above the target: the reported ε under it then certifies nothing."""
    for name in INDEPENDENT_OF[reported.name]:
        other = get_accountant(name)
        if not other.tight or not all(other.supports(e) for e in events):
            continue
        eps = other.epsilon(events, delta=delta)
        if eps > target:
            return (f"independent {name} ε={eps:.6g} exceeds the target {target:g} (a valid upper bound above the "
                    f"target: the run is not shown to be within its budget)")
    return None


def _delta_too_large(delta: float, unit: str, events: list[PrivacyEvent], *, records: int | None,
                     participants: int | None) -> str | None:
    """The reason, if δ ≥ 1/n: a mechanism may then publish a record (or a participant) outright with probability δ.

    n is the record count from outside the ledger; without one, the smallest n the events allow (a DP-SGD sampling
    rate q = batch/n implies n ≥ 1/q); at participant level, the number of participants.
    """
    if unit == "record":
        if records is not None:
            n, source = float(records), "its record count"
        else:
            rates = [e.sample_rate for e in events if e.sample_rate < 1.0]
            if not rates:
                return None
            n, source = 1.0 / max(rates), "the fewest records its sampling rate allows"
    elif participants is not None:
        n, source = float(participants), "the number of participants"
    else:
        return None
    if delta * n >= 1.0:
        return f"δ={delta:g} ≥ 1/n = {1.0 / n:.3g} (n = {n:g}, {source}): such a δ permits releasing a {unit} outright"
    return None


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


def _worst(a: Status, b: Status) -> Status:
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
    keys: str | Path | None = None,
    roster: str | Path | None = None,
    allow_unpinned: bool = False,
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
        Participant → pinned hex public key from a source outside the run
        directory (e.g. a roster checked with each owner). Without it, the
        simulation's key store is consulted (``keys``).
    expected_heads : mapping, optional
        Participant → final chain head recorded outside the ledger (detects a
        rollback to an earlier seal, which nothing inside the file can).
    full_recheck : bool
        Recompute every entry's running ε (default) or only the final values.
    keys : str or Path, optional
        Root of the simulations' key store (default ``$SECUREFL_KEYS``, else the
        user's data directory); used only when neither ``public_keys`` nor
        ``roster`` is given.
    roster : str or Path, optional
        A key directory whose ``roster/<id>.pub`` pins every ledger (e.g. a
        deployment's ``COORDINATOR/keys``, provisioned with every owner's key);
        a ledger whose participant it lacks is an error
        (:class:`securefl.crypto.keystore.KeyFileError`).
    allow_unpinned : bool
        Let a ledger whose key nothing outside the run confirms pass (still
        flagged ``unpinned``, with a warning).

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
    stems = [path.name.removesuffix(".jsonl") for path in files]
    if public_keys is None and roster is None:
        pinned = _key_store_keys(run_dir, stems, keys, notes)
    else:
        pinned = {**(roster_keys(roster, stems) if roster is not None else {}), **(public_keys or {})}
    record = _RunRecord.read(run_dir)
    for path, stem in zip(files, stems, strict=True):
        plan = record.plan_of(stem)
        ledger_rows = audit_ledger(
            path,
            tolerance=tolerance,
            independent_rtol=independent_rtol,
            independent_atol=independent_atol,
            public_key=pinned.get(stem),
            expected_head=(expected_heads or {}).get(stem),
            full_recheck=full_recheck,
            records=plan.get("records") if isinstance(plan.get("records"), int) else None,
            participants=record.n_participants,
        )
        is_pinned = stem in pinned
        for row in ledger_rows:
            update: dict[str, Any] = {"pinned": is_pinned}
            if not is_pinned:
                update["status"] = _worst(row.status, "unpinned")
                update["reasons"] = (*row.reasons, "no public key from outside the run directory to pin this "
                                                   "ledger's seal to: a re-sealed ledger would look the same")
            rows.append(row.model_copy(update=update))
    rows = _cross_check(rows, record, notes)
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
    notes.extend(approval_notes(files))
    return AuditReport(
        run_dir=str(run_dir),
        rows=tuple(final),
        notes=tuple(notes),
        tolerance=tolerance,
        independent_rtol=independent_rtol,
        independent_atol=independent_atol,
        allow_unpinned=allow_unpinned,
    )


# ----- pinning: public keys from outside the run directory ----------------------------------------
def roster_keys(key_dir: str | Path, participants: list[str]) -> dict[str, str]:
    """Hex public keys of ``participants`` from a key directory's roster (a missing one raises KeyFileError)."""
    from securefl.crypto.keystore import load_roster
    from securefl.crypto.signing import public_key_bytes

    return {pid: public_key_bytes(key).hex() for pid, key in load_roster(Path(key_dir), participants).items()}


def _key_store_keys(run_dir: Path, participants: list[str], root: str | Path | None, notes: list[str]) -> dict[str, str]:
    """Hex public keys of the simulation's owners from its key store's roster (outside the run directory)."""
    from securefl.crypto.keystore import KeyFileError, simulation_key_dir
    from securefl.crypto.signing import load_public_key, public_key_bytes

    try:
        run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        roster = simulation_key_dir(str(run_id), root) / "roster"
    except (OSError, ValueError, KeyError, TypeError, KeyFileError):
        return {}
    found: dict[str, str] = {}
    for pid in participants:
        try:
            found[pid] = public_key_bytes(load_public_key((roster / f"{pid}.pub").read_bytes())).hex()
        except (OSError, ValueError):
            continue
    if found:
        notes.append(f"ledger keys pinned to the key store {roster}")
    return found


# ----- cross-check: the ledgers against the record of what left -----------------------------------
class _RunRecord:
    """What the run directory says left each participant, and the plan each owner's noise was calibrated for."""

    def __init__(self) -> None:
        self.unit: str = "none"
        self.node: bool = False
        self.n_participants: int | None = None
        self.releases: list[dict[str, Any]] | None = None
        self.plan: dict[str, Any] | None = None
        self.summary_epsilon: dict[str, float] = {}
        self.calibrated: list[float] | None = None  # every σ privacy_calibration.json holds
        self.problems: list[str] = []  # about the record itself: missing or unreadable files

    def plan_of(self, participant: str) -> dict[str, Any]:
        if self.plan is None:
            return {}
        entry = self.plan.get("participants", {}).get(participant)
        return entry if isinstance(entry, dict) else {}

    @classmethod
    def read(cls, run_dir: Path) -> _RunRecord:
        import yaml

        record = cls()
        try:
            raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            raw = None
        if isinstance(raw, dict):
            privacy = raw.get("privacy")
            record.unit = str(privacy.get("unit", "none")) if isinstance(privacy, dict) else "none"
            if isinstance(raw.get("participants"), list):
                record.n_participants = len(raw["participants"])
        try:
            record.node = isinstance(json.loads((run_dir / "run.json").read_text()).get("participant"), str)
        except (OSError, ValueError, AttributeError):
            pass
        expected = record.unit != "none" and not record.node
        path = run_dir / RELEASES_FILE
        if path.exists():
            try:
                record.releases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                if not all(isinstance(r, dict) for r in record.releases):
                    raise ValueError("a line is not an object")
            except (OSError, ValueError) as exc:
                record.releases = None
                record.problems.append(f"{path.name} is unreadable ({exc}): the releases cannot be cross-checked")
        elif expected:
            record.problems.append(f"{path.name} is missing: config.yaml puts the run under {record.unit}-level DP, "
                                   "and without the record of what left the participants no ledger can be "
                                   "cross-checked (a run made before securefl recorded releases must be re-run)")
        path = run_dir / PLAN_FILE
        if path.exists():
            try:
                record.plan = json.loads(path.read_text())
                if not isinstance(record.plan, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError) as exc:
                record.plan = None
                record.problems.append(f"{path.name} is unreadable ({exc}): the booked σ cannot be checked")
        elif expected:
            record.problems.append(f"{path.name} is missing: the calibrated σ of each owner cannot be checked")
        try:
            cache = json.loads((run_dir / "privacy_calibration.json").read_text())
            record.calibrated = [float(v) for v in cache.values() if isinstance(v, int | float)]
        except (OSError, ValueError, AttributeError):
            pass
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
            for p in summary.get("participants", []):
                if isinstance(p, dict) and isinstance(p.get("epsilon"), int | float):
                    record.summary_epsilon[str(p.get("id"))] = float(p["epsilon"])
        except (OSError, ValueError, AttributeError):
            pass
        return record


def _cross_check(rows: list[AuditRow], record: _RunRecord, notes: list[str]) -> list[AuditRow]:
    """Add each participant's unbooked releases (and any missing record) to its rows."""
    if record.releases is None and record.plan is None and not record.problems:
        if record.node:
            notes.append("note: a node's directory holds no record of what left it (the coordinator's "
                         f"{RELEASES_FILE} does): the ledger was not cross-checked against its releases")
        return rows
    contents: dict[str, LedgerContents | None] = {}
    for row in rows:
        if row.participant not in contents:
            try:
                contents[row.participant] = read_ledger(row.file)
            except (LedgerCorrupt, OSError):
                contents[row.participant] = None  # already ``tampered``
    problems = {pid: _unbooked(pid, ledger, record) for pid, ledger in contents.items() if ledger is not None}
    out = []
    for row in rows:
        extra = problems.get(row.participant, [])
        status = row.status
        if record.problems:
            status = _worst(status, "tampered")
        if extra:
            status = _worst(status, "unbooked")
        out.append(row.model_copy(update={"status": status, "reasons": (*row.reasons, *record.problems, *extra)}))
    return out


def _unbooked(pid: str, ledger: LedgerContents, record: _RunRecord) -> list[str]:
    """Why ``pid``'s ledger does not cover what the run recorded of it (empty if it does)."""
    problems: list[str] = []
    releases = [e for e in ledger.entries if e["kind"] == "release"]
    private = [e for e in releases if e["mechanism"] != "none"]
    unit = record.unit
    for rel in record.releases or []:
        if rel.get("sender") != pid or not rel.get("private_fields"):
            continue
        rnd, kind = rel.get("round"), rel.get("kind")
        what = f"round {rnd}: {pid!r} sent a {kind!r} release to {rel.get('receiver')!r}"
        if unit == "participant":
            if not any(e["round"] == rnd and e["payload"] == kind and e["unit"] == "participant" for e in private):
                problems.append(f"{what}, and its ledger has no participant-level entry of round {rnd} for {kind!r}")
        elif unit == "record":
            if not isinstance(rnd, int) or not any(e["round"] <= rnd and e["unit"] == "record" for e in releases):
                problems.append(f"{what} before any training its ledger books (no record-level entry up to round "
                                f"{rnd})")
    plan = record.plan_of(pid)
    if record.plan is not None and not plan:
        problems.append(f"{PLAN_FILE} has no calibration for {pid!r}")
    sigma = plan.get("noise_multiplier")
    if isinstance(sigma, int | float):
        distributed = (record.plan or {}).get("noise") == "distributed"
        # The plan's σ is the calibration's result (distributed noise scales it by the cohort after).
        if record.calibrated is not None and not (unit == "participant" and distributed) and not any(
                _close(float(sigma), c, _SIGMA_RTOL) for c in record.calibrated):
            problems.append(f"{PLAN_FILE} gives {pid!r} σ={sigma:.6g}, which privacy_calibration.json never "
                            "calibrated")
        for e in private:
            where = f"round {e['round']}, entry {e['seq']} ({e['payload']!r})"
            booked = float(e["noise_multiplier"])
            if e["unit"] == "record" and e["payload"] == "label_histogram":
                want = plan.get("histogram_noise_multiplier")
                if isinstance(want, int | float) and not _close(booked, float(want), _SIGMA_RTOL):
                    problems.append(f"{where}: books σ={booked:.6g}, but its histograms are planned at σ={want:.6g}")
                continue
            if e["unit"] == "participant" and distributed:
                # The booked worst case (only t of n shares in the sum) is below the σ drawn, never above it.
                if booked > float(sigma) * (1 + _SIGMA_RTOL):
                    problems.append(f"{where}: books σ={booked:.6g}, more than the calibrated σ={sigma:.6g} it drew")
                continue
            if not _close(booked, float(sigma), _SIGMA_RTOL):
                problems.append(f"{where}: books σ={booked:.6g}, but the calibrated σ of {pid!r} is {sigma:.6g}")
            if e["unit"] == "record":
                # The noise was calibrated for at most this rate; a larger one spends more than planned. (Fewer
                # booked steps than were taken cannot be told from the plan: a run may stop early.)
                rate = plan.get("sample_rate")
                if isinstance(rate, int | float) and float(e["sample_rate"]) > float(rate) * (1 + _SIGMA_RTOL):
                    problems.append(f"{where}: books a sampling rate q={e['sample_rate']:.6g} above the planned "
                                    f"{rate:.6g}")
        if isinstance(plan.get("delta"), int | float) and not _close(float(plan["delta"]), float(ledger.header["delta"]),
                                                                     _SIGMA_RTOL):
            problems.append(f"ledger δ={ledger.header['delta']:g}, but the plan calibrated for δ={plan['delta']:g}")
    claimed = record.summary_epsilon.get(pid)
    if claimed is not None and unit in ("record", "participant"):
        held = float(ledger.entries[-1].get("epsilon_by_unit", {}).get(unit, 0.0)) if ledger.entries else 0.0
        if claimed > held * (1 + 1e-6) + 1e-9:
            problems.append(f"summary.json reports ε={claimed:.6g} for {pid!r}, but its ledger holds only "
                            f"ε={held:.6g}: spend is missing from the ledger")
    return problems


# ----- the data owner's approval (securefl.deploy.approval) ----------------------------------------
def approval_notes(files: list[Path]) -> list[str]:
    """One line per ledger: the owner's approval the run went ahead under (its digest and the approving key),
    or "no approval". A ledger that cannot be read is reported by its row, not here."""
    lines = []
    for path in files:
        try:
            contents = read_ledger(path)
        except (LedgerCorrupt, OSError):
            continue
        pid = contents.header["participant"]
        approvals = [e for e in contents.entries if e["kind"] == "approval"]
        if not approvals:
            lines.append(f"owner approval: {pid}: no approval")
        for entry in approvals:
            lines.append(f"owner approval: {pid}: approved {entry['approval_digest'][:12]}… with key "
                         f"{entry['approver_key']} (approved {entry['approved'].get('approved_at') or '?'})")
    return lines
