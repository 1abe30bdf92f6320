"""The runtime's side of privacy: ledgers, budgets, calibration, and the DP trainer or layer.

Built once per run (and again, identically, on resume) for the participants one host holds (every one in a
simulation, one per node in a deployment), by :func:`securefl.runtime.builder.host_participants`:

1. each participant's binding budget is the stricter of its own policy file
   and the experiment's target (``resolve_budget``), and the report says which
   one bound;
2. its ``Ledger`` (``RUN_DIR/ledgers/<id>.jsonl``) is opened, or re-opened and
   verified on resume: one ledger per data owner for the whole run, so ε can
   never silently reset;
3. its noise multiplier is calibrated before round 1 from its own target,
   δ and planned releases, with the same accountant that reports;
4. record level: its trainer becomes DP-SGD, committing every training call
   to its ledger before the first step; participant level: a
   :class:`ParticipantDPLayer` clips and noises every private payload it
   shares, committing before the message leaves.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securefl.config import ExperimentConfig
from securefl.core.durable import write_atomically
from securefl.privacy.budget import ExperimentTarget, PrivacyPolicy, resolve_budget
from securefl.privacy.calibration import calibrate_noise_multiplier
from securefl.privacy.dp_sgd import DPSGDTrainer
from securefl.privacy.errors import LedgerCorrupt, PolicyError
from securefl.privacy.events import AnyEvent
from securefl.privacy.ledger import Ledger
from securefl.privacy.mechanisms import histogram_event

if TYPE_CHECKING:
    from securefl.core.party import Party
    from securefl.layers.privacy import ParticipantDPLayer
    from securefl.protocols import Protocol

# A party's Ed25519 keys by id (securefl.runtime.builder.KeyRing): the ledger seal is signed with them.
PartyKeysFor = Callable[[str], Any]


@dataclass
class ParticipantPrivacy:
    participant: str
    unit: str
    target_epsilon: float
    delta: float
    budget_note: str
    noise_multiplier: float
    planned_steps: int
    sample_rate: float
    ledger: Ledger
    adversary: str = ""


@dataclass
class PrivacyRuntime:
    """The hosted participants' ledgers and DP machinery. It knows the round only as the host tells it
    (:meth:`enter_round`), and holds no reference back to the host."""

    config: ExperimentConfig
    out: Path
    keys: PartyKeysFor
    participants: dict[str, ParticipantPrivacy] = field(default_factory=dict)
    layer: ParticipantDPLayer | None = None
    round: int = 0

    @property
    def unit(self) -> str:
        return str(self.config.privacy.unit)

    @property
    def accountant(self) -> str:
        return str(self.config.privacy.accountant)

    @classmethod
    def build(cls, *, config: ExperimentConfig, out: Path, protocol: Protocol, parties: Sequence[Party],
              keys: PartyKeysFor) -> PrivacyRuntime:
        """Ledgers, calibrated noise and the DP trainer or layer for ``parties`` (the ones this process hosts)."""
        cfg = config.privacy
        from securefl.layers.privacy import refuse_unsafe_releases

        # Before any ledger opens, and on every owner's node: a release the ledger could not book is refused here.
        refuse_unsafe_releases(protocol, unit=cfg.unit, noise=cfg.noise)
        runtime = cls(config=config, out=Path(out), keys=keys)
        for party in parties:
            runtime.participants[party.id] = runtime._set_up(protocol, party, config.participants[party.index])
        if cfg.unit == "record":
            for party in parties:
                runtime._inject_dp_sgd(party)
        else:
            from securefl.layers.privacy import ParticipantDPLayer

            runtime.layer = ParticipantDPLayer(
                noise_multipliers={pid: p.noise_multiplier for pid, p in runtime.participants.items()},
                clip_norm=cfg.clip_norm, mode=cfg.noise, commit=runtime.commit,
                min_contributors=config.cohort_fraction())
            # n and t from the config this side accepted, never from the coordinator's sampled lists.
            runtime.layer.plan_cohort(config.cohort())
        return runtime

    # ----- set-up ----------------------------------------------------------------------------
    def _set_up(self, protocol: Protocol, party: Party, pcfg: Any) -> ParticipantPrivacy:
        cfg = self.config.privacy
        policy = None
        if pcfg.policy_file:
            policy = PrivacyPolicy.from_file(pcfg.policy_file)
        target = pcfg.target_epsilon or cfg.target_epsilon or (policy.max_epsilon if policy else None)
        if target is None:
            raise PolicyError(f"participant {party.id!r}: no ε target (set target_epsilon or a policy_file)")
        experiment = ExperimentTarget(target_epsilon=target, delta=pcfg.delta or cfg.delta, unit=cfg.unit)
        _refuse_large_delta(self.config, party, experiment.delta,
                            f"participants.{party.index}.delta" if pcfg.delta else "privacy.delta")
        if policy is not None:
            _refuse_large_delta(self.config, party, policy.delta,
                                f"{pcfg.policy_file}: field 'delta' of the privacy policy")
        budget, note = resolve_budget(policy, experiment, participant=party.id)
        path = ledger_path(self.out, party.id)
        if not path.exists() and _has_checkpoint(self.out):
            # A fresh ledger would restart this participant's ε at 0 mid-run.
            raise LedgerCorrupt("ledger file is missing, but the run directory holds a checkpoint of this run: "
                                "refusing to start a new ledger (its spend would restart at 0); restore the file",
                                path=str(path))
        ledger = Ledger.open(path, participant=party.id,
                             max_epsilon=budget.max_epsilon, delta=budget.delta,
                             signing_key=self.keys(party.id).private_key, accountant=cfg.accountant)
        sigma, steps, rate = self._calibrate(protocol, party, budget.max_epsilon, budget.delta)
        return ParticipantPrivacy(participant=party.id, unit=cfg.unit, target_epsilon=budget.max_epsilon,
                                  delta=budget.delta, budget_note=note, noise_multiplier=sigma,
                                  planned_steps=steps, sample_rate=rate, ledger=ledger,
                                  adversary=adversary_of(self.config))

    def _calibrate(self, protocol: Protocol, party: Party, target: float, delta: float) -> tuple[float, int, float]:
        cfg = self.config.privacy
        if cfg.unit == "record":
            # Every planned DP-SGD call, composed at the largest sampling rate among them: an upper
            # bound (ε grows with q), so the run ends at or under the target.
            n = max(party.num_samples, 1)
            plan = protocol.private_training_plan(party) + protocol.warm_start_plan(party)
            if not plan:
                from securefl.protocols.base import ProtocolSetupError

                raise ProtocolSetupError(f"privacy.unit = 'record': {protocol.name} does no training at the "
                                         "participants, so there is nothing for per-participant DP-SGD to protect")
            steps = sum(DPSGDTrainer.steps_for(n, batch_size=b, epochs=e, steps=s) for b, e, s in plan)
            rate = max(min(1.0, b / n) for b, _, _ in plan)
            # Label histograms the protocol releases (Gaussian, sensitivity 1) come out of the same budget,
            # so DP-SGD is calibrated for what is left after them.
            histograms = [histogram_event(cfg.histogram_noise_multiplier)] * protocol.private_histogram_releases(party)
            sigma = self._calibrated(self.out, target_epsilon=target, delta=delta, sample_rate=rate, steps=steps,
                                     accountant=cfg.accountant, already_spent=histograms)
            return sigma, steps, rate
        releases = self.config.run.rounds
        sigma = self._calibrated(self.out, target_epsilon=target, delta=delta, sample_rate=1.0, steps=1,
                                 releases=releases, accountant=cfg.accountant, unit="participant",
                                 relation="replace_one", sensitivity=2 * cfg.clip_norm)
        if cfg.noise == "distributed":
            # The ledger books the t-1 other shares of the smallest sum accepted (a participant that sees the sum
            # knows its own share), with n and t from the config: ParticipantDPLayer.booked_noise_factor.
            cohort = self.config.cohort()
            sigma /= math.sqrt((cohort.minimum - 1) / cohort.per_round)
        return sigma, releases, 1.0

    @staticmethod
    def _calibrated(out: Path, **inputs: Any) -> float:
        """σ from :func:`calibrate_noise_multiplier`, remembered in ``out/privacy_calibration.json`` under its
        exact inputs: a deployed node rebuilt for every message (or a resumed run) need not redo the search,
        and the same inputs always give the same σ."""
        path = Path(out) / "privacy_calibration.json"
        key = json.dumps(inputs, sort_keys=True, default=lambda event: event.model_dump(mode="json"))
        cache = json.loads(path.read_text()) if path.exists() else {}
        if key not in cache:
            cache[key] = calibrate_noise_multiplier(**inputs)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, (json.dumps(cache, indent=1) + "\n").encode())
        return float(cache[key])

    def _inject_dp_sgd(self, party: Party) -> None:
        pp = self.participants[party.id]
        party.trainer = DPSGDTrainer(noise_multiplier=pp.noise_multiplier,
                                     max_grad_norm=self.config.privacy.max_grad_norm,
                                     histogram_noise_multiplier=self.config.privacy.histogram_noise_multiplier,
                                     commit=functools.partial(self.commit, party.id))

    # ----- during the run ------------------------------------------------------------------
    def enter_round(self, rnd: int) -> None:
        """The round every commit is booked under until the next call (the host calls it as a round starts)."""
        self.round = rnd

    def commit(self, participant: str, event: AnyEvent) -> None:
        """Check-then-commit on the participant's own ledger (raises BudgetExceeded)."""
        self.participants[participant].ledger.commit(event, round=self.round)

    def seal_all(self) -> None:
        for pid, pp in self.participants.items():
            pp.ledger.seal(self.keys(pid).private_key)

    def close_all(self) -> None:
        """Release the ledger files (e.g. after a failed run in this process); nothing is lost: every
        commit was already on disk."""
        for pp in self.participants.values():
            if not pp.ledger.closed:
                pp.ledger.close()

    def summary(self, participant: str) -> dict[str, Any]:
        pp = self.participants[participant]
        return {
            "unit": pp.unit,
            "epsilon": pp.ledger.epsilon(pp.unit) if pp.ledger.events else 0.0,
            "delta": pp.delta,
            "target_epsilon": pp.target_epsilon,
            "noise_multiplier": pp.noise_multiplier,
            "accountant": self.accountant,
            "budget_note": pp.budget_note,
            "adversary": pp.adversary,
        }

    def ledger_path(self, participant: str) -> Path:
        return ledger_path(self.out, participant)


def _refuse_large_delta(config: ExperimentConfig, party: Party, delta: float, field: str) -> None:
    """PolicyError, before round 1, if δ >= 1/n: such a δ allows a mechanism that publishes one unit's data
    outright (n: the participant's records at record level, the run's participants at participant level)."""
    if config.privacy.unit == "record":
        n, what = max(party.num_samples, 1), f"its {party.num_samples} training records (record-level DP)"
    else:
        n, what = len(config.participants), f"the run's {len(config.participants)} participants " \
                                                  "(participant-level DP)"
    if delta >= 1 / n:
        raise PolicyError(f"participant {party.id!r}: {field} = {delta:g} is not below 1/n = {1 / n:.3g} (n = "
                          f"{what}); a δ that large allows releasing one unit's data outright. Choose δ well below "
                          f"1/n (e.g. 1e-5)")


def adversary_of(config: ExperimentConfig) -> str:
    """Whom a booked ε protects against, in words (the summary and report carry it)."""
    cfg = config.privacy
    if cfg.unit == "record":
        return ("any observer of what the participant sends (the coordinator, peers, a reader of the run "
                "directory): DP-SGD's noise is added on the participant")
    if cfg.noise == "local":
        return ("any observer of each release (the coordinator, peers, a reader of the run directory): the "
                "participant adds the full noise")
    cohort = config.cohort()
    t, n = cohort.minimum, cohort.per_round
    text = (f"any single observer of an aggregate, which holds at least t = {t} of n = {n} contributors: the "
            f"coordinator, a reader, or a participant that subtracts its own share (booked with the t-1 other "
            f"shares, σ·sqrt({t - 1}/{n})); not a coalition: k colluding owners remove k shares")
    if config.secure_aggregation == "ckks":
        text += ("; under CKKS all owners share one key, so the coordinator colluding with one owner can open any "
                 f"single upload, which carries only its own share (σ/sqrt({n}))")
    return text


def _has_checkpoint(run_dir: Path) -> bool:
    """Whether this run (or this node) has checkpointed progress, so its ledgers must already exist."""
    return any((Path(run_dir) / "checkpoints").glob("*.pt"))


def ledger_path(run_dir: Path, participant: str) -> Path:
    """Where a participant's ledger lives in a run directory (the audit reads the same place)."""
    return run_dir / "ledgers" / f"{participant}.jsonl"
