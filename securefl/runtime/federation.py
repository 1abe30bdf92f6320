"""The round loop: who runs when, what crosses the wire, and what is written to disk.

The runtime owns everything that lives longer than a round: the parties, the
transport, the checkpoints and the metrics (and, with the privacy layer, one
ledger per data owner). Protocols only compute.

Determinism and resume: every random draw is seeded from (run seed, purpose,
round, party) via :func:`derive_seed`, not from a global stream, so a run that
is killed after round k and resumed from its checkpoint replays exactly what an
uninterrupted run would have done; no RNG state needs saving.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from securefl.config import (
    ConfigError,
    ExperimentConfig,
    config_differences,
    dump_config,
    parse_config_text,
)
from securefl.core.aggregator import Aggregator, PlainAggregator
from securefl.core.durable import append_durably, write_atomically
from securefl.core.message import AGGREGATOR, BROADCAST, Message
from securefl.core.party import DataView, FederationContext, Party
from securefl.core.seeding import derive_seed, seeded
from securefl.data.datasets import Dataset, load_dataset
from securefl.data.partition import FederatedSplit
from securefl.data.split import build_split
from securefl.layers.base import Layer, Rejected
from securefl.layers.signing import SigningLayer
from securefl.models.zoo import build_model
from securefl.protocols import Protocol, get_protocol
from securefl.protocols.base import Downlink
from securefl.runtime.builder import KeyRing, host_participants
from securefl.runtime.checkpoint import CHECKPOINT, RunDirError, load_checkpoint, lock_run_dir, save_atomically
from securefl.runtime.host import HostReport, ParticipantHost, Participants, RemoteHosts, as_list, sampled_per_round
from securefl.runtime.privacy import PrivacyRuntime
from securefl.runtime.transport import InProcessTransport, Transport

#: One line per message a participant sent (sender, receiver, round, kind, private fields, payload digest).
RELEASES = "releases.jsonl"
#: Each owner's calibrated σ and the plan behind it.
PRIVACY_PLAN = "privacy_plan.json"


def build_world(config: ExperimentConfig, run_id: str, *, local: set[str] | None = None,
                tables: Mapping[str, Any] | None = None,
                ) -> tuple[Dataset, FederatedSplit, FederationContext, list[Party], Protocol]:
    """Everything both sides derive from the config alone, deterministically in ``run.seed``: the data
    set and its split, the context every protocol sees, the participants and the protocol.

    ``local``: the participants whose own data this process may read (None: all, a simulation).
    ``tables``: owner-supplied tables given in code (``data.dataset = tables``, see :mod:`securefl.api`).
    """
    if config.data.dataset in ("files", "tables"):
        from securefl.data.tables import owner_tables

        if config.data.dataset == "tables" and tables is None:
            raise ConfigError("data.dataset = 'tables': the tables are given in code (securefl.api.train); "
                              "use data.dataset = 'files' to read them from CSV files")
        dataset, split = owner_tables(config, local=local, given=tables)
    else:
        dataset = load_dataset(config.data.dataset, seed=config.run.seed, data_dir=config.data.data_dir)
        split = build_split(config.data, dataset, seed=config.run.seed, n_parties=len(config.participants))

    def view(idx: np.ndarray) -> DataView:
        return DataView(dataset.x_train, dataset.y_train, torch.as_tensor(idx, dtype=torch.long))

    data = config.data
    if len(split.holdout):
        # data.holdout_size: evaluate on held-out train records (hyperparameter search), never on the test split.
        held = torch.as_tensor(split.holdout, dtype=torch.long)
        eval_x, eval_y = dataset.x_train[held], dataset.y_train[held]
    else:
        eval_x, eval_y = dataset.x_test, dataset.y_test
    test_mask = torch.isin(eval_y, torch.as_tensor(split.private_classes))
    eval_classes = torch.as_tensor(sorted(split.private_classes)) if data.private_classes else None
    ctx = FederationContext(
        run_id=run_id, seed=config.run.seed, dataset=dataset, split=split, training=config.training,
        public=view(split.public), public_val=view(split.public_val), public_labelled=data.public_labelled,
        test_x=eval_x[test_mask], test_y=eval_y[test_mask], eval_classes=eval_classes,
        model_builder=build_model, rounds=config.run.rounds, eval_every=config.run.eval_every,
    )
    parties = [Party(id=p.id, index=i, model_name=p.model, train=view(split.parties[i].train),
                     val=view(split.parties[i].val), lr=p.lr)
               for i, p in enumerate(config.participants)]
    protocol = get_protocol(config.protocol)(config.protocol_config(), ctx)
    return dataset, split, ctx, parties, protocol


@dataclass
class RoundRecord:
    round: int
    sampled: list[str]
    participants: dict[str, dict[str, float]]
    server: dict[str, float]
    communication_bytes: dict[str, int]
    elapsed_s: float
    rejected: list[dict[str, str]]
    # Sampled participants whose contribution never arrived (dropped, withheld or rejected).
    missing: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        accs = [m["accuracy"] for m in self.participants.values() if "accuracy" in m]
        return {
            "round": self.round,
            "mean_accuracy": float(np.mean(accs)) if accs else None,
            "participants": self.participants,
            "server": self.server,
            "sampled": self.sampled,
            "communication_bytes": self.communication_bytes,
            "rejected": self.rejected,
            "missing": self.missing,
            "elapsed_s": round(self.elapsed_s, 3),
        }


class Federation:
    """One experiment: build everything from a validated config, run the rounds, write the run dir."""

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 transport: Transport | None = None,
                 on_round_end: Callable[[int], None] | None = None,
                 remote: RemoteHosts | None = None, run_id: str | None = None, tables: Mapping[str, Any] | None = None,
                 keys: str | Path | None = None) -> None:
        """``remote``: participants hosted elsewhere (e.g. :class:`securefl.deploy.flower.FlowerParticipants`);
        then this process is only the coordinator, with the aggregator's keys and no participant data.
        Without it every participant is hosted here (a simulation).

        ``keys``: the root of the simulation's key store (default ``$SECUREFL_KEYS`` or the user's data
        directory; see :mod:`securefl.crypto.keystore`). The owners' private keys never go into ``out_dir``."""
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.transport = transport or InProcessTransport()
        self.on_round_end = on_round_end
        made_here = not resume and not self.out.exists()
        self._run_lock: int | None = None
        self._prepare_run_dir(resume, run_id=run_id)
        keys_made_here = False
        try:
            # A coordinator's own keys stay in its directory (they cannot seal an owner's ledger); a simulation's
            # owners' keys live outside the run directory, where no reader of the run can re-seal with them.
            self.key_dir = self.out / "keys" if remote is not None else self._simulation_key_dir(resume, keys)
            keys_made_here = remote is None and not self.key_dir.exists()
            # A coordinator of remote participants reads no participant's data (local = nobody).
            self.dataset, self.split, self.ctx, self.parties, self.protocol = build_world(
                config, self.run_id, tables=tables, local=set() if remote is not None else None)
            self.aggregator: Aggregator = PlainAggregator()
            # Refuse impossible set-ups before any training.
            self.protocol.validate_participants(self.parties)
            with seeded(derive_seed(config.run.seed, "setup_server")):
                self.protocol.setup_server(self.parties)
            self._rejected: list[dict[str, str]] = []
            self._missing: list[str] = []
            self.stopped: dict[str, str] = {}
            self._current_round = 0
            self._metrics_count: int | None = None
            # One key ring: in a simulation the coordinator and the host share the key store.
            self.keys = KeyRing(self.key_dir)
            self.privacy: PrivacyRuntime | None = None
            self.host: ParticipantHost | None = None  # the participants hosted in this process (a simulation)
            if remote is None:
                self.host = host_participants(config, run_id=self.run_id, out=self.out, ctx=self.ctx,
                                              protocol=self.protocol, parties=self.parties, hosted=self.parties,
                                              keys=self.keys, side="simulation", stopped=self.stopped)
                self.privacy = self.host.privacy
                self.participants: Participants = self.host
                # One stack: each layer's participant hooks run in the host, its server hooks here.
                self.layers: list[Layer] = self.host.layers
                self._publish_public_keys()
                self._write_privacy_plan()
            else:
                if self.protocol.simulation_only:
                    from securefl.protocols import ProtocolSetupError

                    raise ProtocolSetupError(f"{config.protocol} cannot run on separate nodes: {self.protocol.simulation_only}")
                self.participants = remote
                remote.connect(run_id=self.run_id, config_text=dump_config(config))
                from securefl.layers.stack import build_layers

                signers = {AGGREGATOR: self.keys(AGGREGATOR)} if config.signing else {}
                self.layers = build_layers(config, side="coordinator", run_id=self.run_id, key_dir=self.key_dir,
                                           party_ids=[p.id for p in self.parties], signers=signers)
                for layer in self.layers:
                    layer.connect(remote)
                    if isinstance(layer, SigningLayer):
                        # A resumed coordinator is a new process: what it accepted before the crash must still
                        # be refused when replayed to it (each node keeps its own record likewise).
                        layer.keep_replay_state(self.out / "replay")
            for layer in self.layers:
                layer.check(self.protocol, self.parties)
        except BaseException:
            self.release_run_dir()
            if made_here and self._discard_unstarted_run_dir() and keys_made_here:
                shutil.rmtree(self.key_dir, ignore_errors=True)
            raise

    def release_run_dir(self) -> None:
        """Let another process use the run directory (after the run, or when this object is dropped)."""
        fd, self._run_lock = self._run_lock, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # Also when __init__ failed early, or at interpreter shutdown: never raise from a finaliser.
        with contextlib.suppress(Exception):
            self.release_run_dir()

    # ----- set-up ------------------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool, *, run_id: str | None = None) -> None:
        checkpoint = self.out / CHECKPOINT
        config_text = dump_config(self.config)
        if resume:
            if not checkpoint.exists():
                raise RunDirError(f"{self.out}: --resume given but there is no checkpoint ({checkpoint})")
            self._run_lock = lock_run_dir(self.out)
            try:
                self._resume_run_dir(config_text)
            except BaseException:
                self.release_run_dir()
                raise
            return
        if checkpoint.exists() or (self.out / "metrics.jsonl").exists():
            raise RunDirError(
                f"{self.out} already holds a run; use --resume to continue it or choose another --out "
                "(securefl never overwrites a run, its ledgers or its checkpoints)"
            )
        if any((self.out / "ledgers").glob("*.jsonl")):
            raise RunDirError(
                f"{self.out} holds the ledgers of a run that stopped before its first checkpoint, so there is "
                "nothing to resume; move the directory away or choose another --out "
                "(securefl never overwrites a ledger)"
            )
        (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._run_lock = lock_run_dir(self.out)
        # Always a random part: names repeat, and signatures, replay records and node directories tell runs
        # apart by their id alone (a message of one run must never be accepted in another). --resume keeps
        # the id saved in run.json.
        self.run_id = f"{run_id or self.config.run.name or 'run'}-{secrets.token_hex(6)}"
        (self.out / "config.yaml").write_text(config_text)
        (self.out / "run.json").write_text(json.dumps(self._run_info(), indent=2) + "\n")

    def _resume_run_dir(self, config_text: str) -> None:
        """--resume: the saved config must be this one (up to fields added since), and run.json names the run."""
        saved = (self.out / "config.yaml").read_text()
        if saved != config_text:
            self._check_same_config(saved)
            # Only fields added since the run started, at their defaults: the record gets them too.
            (self.out / "config.yaml").write_text(config_text)
        try:
            self.run_id = str(json.loads((self.out / "run.json").read_text())["run_id"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"{self.out / 'run.json'}: unreadable or corrupt ({type(exc).__name__}); it names the "
                              "run that the ledgers and signatures belong to, so the run cannot resume without "
                              "it") from None

    def _discard_unstarted_run_dir(self) -> bool:
        """Set-up failed (a refusal, missing data, an interrupt) in a directory this invocation created: remove it,
        so a refused run leaves nothing behind. It holds no checkpoint or metric by then, and no ledger books a
        spend before round 1; a ledger that does, or cannot be read, keeps the directory all the same."""
        from securefl.privacy.ledger import read_ledger

        for path in (self.out / "ledgers").glob("*.jsonl"):
            try:
                spent = bool(read_ledger(path).events)
            except Exception:  # noqa: BLE001 - unreadable: never delete a ledger on an assumption
                spent = True
            if spent:
                return False
        shutil.rmtree(self.out, ignore_errors=True)
        return True

    def _check_same_config(self, saved_text: str) -> None:
        """A run resumes only under the config it started with. A run made by an earlier version lacks the fields
        added since; read with their defaults, it is the same config (so it resumes), and anything else differs."""
        mismatch = (f"{self.out}/config.yaml differs from the config given to --resume; resume with the same config "
                    "(and --set overrides) as the original run")
        try:
            saved = parse_config_text(saved_text, f"{self.out}/config.yaml")
        except ConfigError as exc:
            raise RunDirError(f"{mismatch} ({self.out}/config.yaml no longer parses: {exc})") from None
        differences = config_differences(saved.model_dump(mode="json"), self.config.model_dump(mode="json"))
        if differences:
            shown = ", ".join(differences[:5]) + (f" and {len(differences) - 5} more" if len(differences) > 5 else "")
            raise RunDirError(f"{mismatch}; they differ at {shown}")

    def _run_info(self) -> dict[str, Any]:
        import opacus
        import sklearn

        return {
            "run_id": self.run_id,
            "seed": self.config.run.seed,
            "protocol": self.config.protocol,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "opacus": opacus.__version__,
                         "scikit-learn": sklearn.__version__},
        }

    def _simulation_key_dir(self, resume: bool, root: str | Path | None) -> Path:
        """The key store of this run, outside the run directory; on resume it must hold the keys the run began
        with (a fresh key could not extend its sealed ledgers, and would sign as someone else)."""
        from securefl.crypto.keystore import KEYS_ENV, simulation_key_dir

        key_dir = simulation_key_dir(self.run_id, root)
        if key_dir.resolve().is_relative_to(self.out.resolve()):
            raise RunDirError(f"--keys {key_dir}: the owners' private keys must live outside the run directory "
                              f"{self.out}, where any reader of the run could re-seal a ledger with them")
        if resume and not key_dir.is_dir() and any((self.out / "ledgers").glob("*.jsonl")):
            older = (f"; a run begun before keys left the run directory has them in {self.out / 'keys'}: move that "
                     "directory there" if (self.out / "keys").is_dir() else "")
            raise RunDirError(f"{key_dir}: the owners' keys of run {self.run_id!r} are not there; resume with the "
                              f"key store the run began with (--keys DIR or ${KEYS_ENV}){older}")
        return key_dir

    def _publish_public_keys(self) -> None:
        """Every owner's public key into the key store's roster: what ``securefl audit`` pins each ledger's seal
        to, from outside the run directory."""
        from securefl.crypto.keystore import publish_public_key

        for pid, keys in self.keys.loaded().items():
            if pid != AGGREGATOR:
                publish_public_key(self.key_dir, keys)

    def _write_privacy_plan(self) -> None:
        """``privacy_plan.json``: each owner's calibrated σ and the plan it was calibrated for, written before
        round 1. The audit checks every ledger entry against it (an entry booking another σ, or a larger
        sampling rate, under-counts) and checks δ against the record count."""
        if self.privacy is None:
            return
        plan = {
            "unit": self.privacy.unit,
            "accountant": self.privacy.accountant,
            "noise": self.config.privacy.noise,
            "participants": {
                pid: {"noise_multiplier": pp.noise_multiplier, "sample_rate": pp.sample_rate,
                      "planned_steps": pp.planned_steps, "delta": pp.delta, "target_epsilon": pp.target_epsilon,
                      "records": self.host.by_id[pid].num_samples if self.host is not None else None,
                      "histogram_noise_multiplier": self.config.privacy.histogram_noise_multiplier}
                for pid, pp in self.privacy.participants.items()},
        }
        # Present from the start, even if nothing leaves: a missing record then means a deleted one.
        (self.out / RELEASES).touch()
        write_atomically(self.out / PRIVACY_PLAN, (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode())

    def _record_releases(self, rnd: int, outgoing: Sequence[Message]) -> None:
        """Append what is about to leave the participants to ``releases.jsonl`` (fsynced before it is sent): the
        record, outside every ledger, that the audit checks each ledger covers."""
        if self.config.privacy.unit == "none":
            return
        private = set(_private_fields(self.protocol))
        lines = []
        for msg in outgoing:
            fields = sorted(n for n in msg.payload if n in private)
            lines.append(json.dumps({"round": rnd, "sender": msg.sender, "receiver": msg.receiver, "kind": msg.kind,
                                     "private_fields": fields, "meta": sorted(msg.meta),
                                     "digest": payload_digest(msg)}, sort_keys=True))
        if not lines:
            return
        append_durably(self.out / RELEASES, "".join(line + "\n" for line in lines).encode())

    # ----- the run -----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start_round = self._restore() if (self.out / CHECKPOINT).exists() else None
        try:
            if start_round is None:
                self._absorb(self.participants.prepare())
                self._log(self._evaluate(0, sampled=[], elapsed=0.0))
                self._checkpoint(0)
                start_round = 1
            self._rounds(start_round)
            facts = self.participants.finish()
            from securefl.report import write_report

            return write_report(self.out, self.config, self.parties, self.protocol, facts=facts, stopped=self.stopped)
        finally:
            self.participants.close()
            self.release_run_dir()

    def _rounds(self, start_round: int) -> None:
        cfg = self.config
        total = (cfg.run.rounds - start_round + 1) * self._n_sampled()
        bar = tqdm(total=total, disable=not self.progress, unit="step", desc=f"{cfg.protocol}", leave=False)
        try:
            for rnd in range(start_round, cfg.run.rounds + 1):
                t0 = time.perf_counter()
                self._current_round = rnd
                sampled = self.sample(rnd)
                if not sampled:
                    break  # every participant has spent its budget
                self._round(rnd, sampled, bar)
                if self.ctx.evaluated(rnd):
                    record = self._evaluate(rnd, sampled, time.perf_counter() - t0)
                    self._log(record)
                    mean = record.to_json()["mean_accuracy"]
                    bar.set_postfix_str(f"round {rnd}/{cfg.run.rounds} mean acc {mean:.3f}")
                self._checkpoint(rnd)
                if self.on_round_end is not None:
                    self.on_round_end(rnd)
        finally:
            bar.close()

    def sample(self, rnd: int) -> list[str]:
        """Participants of round ``rnd``: a seeded uniform sample of the configured fraction."""
        # A participant that has spent its budget stops contributing; the run goes on without it.
        ids = [p.id for p in self.parties if p.id not in self.stopped]
        n = min(self._n_sampled(), len(ids))
        if n == len(ids):
            return ids
        rng = np.random.default_rng(derive_seed(self.config.run.seed, "sample", rnd))
        return [ids[i] for i in sorted(rng.choice(len(ids), size=n, replace=False))]

    def sampled_per_round(self) -> int:
        return self._n_sampled()

    def _n_sampled(self) -> int:
        return sampled_per_round(self.config, len(self.parties))

    def _round(self, rnd: int, sampled: Sequence[str], bar: tqdm) -> None:
        for layer in self.layers:
            layer.start_round(rnd, sampled)
        self._deliver(self.protocol.open_round(rnd, sampled), sampled)
        step = self.participants.step(rnd, {pid: self.transport.receive(pid) for pid in sampled})
        self._absorb(step)
        bar.update(len(sampled))
        self._record_releases(rnd, step.outgoing)
        # Sampled parties step concurrently in a deployment: send only after all have stepped, so a
        # peer-to-peer message never lands in a later peer's client_step inbox instead of its client_update.
        for reply in step.outgoing:
            self.transport.send(reply)
        replies = []
        for msg in self.transport.receive(AGGREGATOR):
            try:
                for layer in reversed(self.layers):
                    msg = layer.server_inbound(msg)
                replies.append(msg)
            except Rejected as rejection:
                self._rejected.append({"sender": rejection.sender, "receiver": AGGREGATOR, "reason": rejection.reason})
        if self.protocol.uplink is not None:
            # A dropout sends nothing, so it is in no rejection: name whoever contributed nothing this round.
            arrived = {m.sender for m in replies} | {m.sender for m in step.outgoing if m.receiver != AGGREGATOR}
            self._missing.extend(pid for pid in sampled if pid not in arrived)
        aggregator = self.aggregator
        for layer in self.layers:
            aggregator = layer.wrap_aggregator(aggregator, rnd)
        with seeded(derive_seed(self.config.run.seed, "server_step", rnd)):
            downlink = self.protocol.server_step(rnd, replies, aggregator) if replies else None
        self._deliver(downlink, sampled)
        self._absorb(self.participants.update(rnd, {pid: self.transport.receive(pid) for pid in sampled}))

    def _absorb(self, report: HostReport) -> None:
        """A host's rejections go to this round's log; its stopped participants leave the sampling."""
        self._rejected.extend(report.rejected)
        self.stopped.update(report.stopped)

    def _send_from_server(self, msg: Message) -> None:
        for layer in self.layers:
            msg = layer.server_outbound(msg)
        self.transport.send(msg)

    def _deliver(self, downlink: Downlink, sampled: Sequence[str]) -> None:
        if downlink is None:
            return
        if isinstance(downlink, Message):
            targets = sampled if downlink.receiver == BROADCAST else [downlink.receiver]
            for pid in targets:
                self._send_from_server(downlink.model_copy(update={"receiver": pid}))
        else:
            for pid, msgs in downlink.items():
                for msg in as_list(msgs):
                    self._send_from_server(msg.model_copy(update={"receiver": pid}))

    def _evaluate(self, rnd: int, sampled: Sequence[str], elapsed: float) -> RoundRecord:
        per_party = self.participants.evaluate(rnd)
        counters = getattr(self.transport, "bytes_by_kind", {})
        record = RoundRecord(round=rnd, sampled=list(sampled), participants=per_party,
                             server={k: float(v) for k, v in self.protocol.evaluate_server().items()},
                             communication_bytes=dict(counters), elapsed_s=elapsed, rejected=list(self._rejected),
                             missing=list(self._missing))
        self._rejected.clear()
        self._missing.clear()
        if hasattr(self.transport, "reset_counters"):
            self.transport.reset_counters()
        return record

    # ----- persistence -------------------------------------------------------------------
    def _log(self, record: RoundRecord) -> None:
        lines = self._metrics_lines()
        append_durably(self.out / "metrics.jsonl", (json.dumps(record.to_json()) + "\n").encode())
        self._metrics_count = lines + 1

    def _metrics_lines(self) -> int:
        """Lines in metrics.jsonl: counted once, then kept (re-reading the file at every checkpoint cost the
        square of the rounds over a run)."""
        if self._metrics_count is None:
            path = self.out / "metrics.jsonl"
            self._metrics_count = len(path.read_text().splitlines()) if path.exists() else 0
        return self._metrics_count

    def _checkpoint(self, rnd: int) -> None:
        state = {
            "round": rnd,
            "run_id": self.run_id,
            "metrics_lines": self._metrics_lines(),
            "protocol": self.protocol.state_dict(),
            "stopped": dict(self.stopped),
            # Remote hosts keep their participants' state on their own nodes.
            "parties": self.host.party_states() if self.host is not None else {},
            "ledger_heads": self.host.ledger_heads() if self.host is not None else {},
        }
        save_atomically(state, self.out / CHECKPOINT)

    def _restore(self) -> int:
        state = load_checkpoint(self.out / CHECKPOINT)
        missing = [k for k in ("round", "run_id", "metrics_lines", "protocol", "parties") if k not in state]
        if missing or state["run_id"] != self.run_id:
            raise RunDirError(f"{self.out / CHECKPOINT}: not a checkpoint of run {self.run_id!r} "
                              f"({'lacks ' + ', '.join(missing) if missing else 'it is of run ' + repr(state['run_id'])}); "
                              "refusing to resume from it")
        metrics = self.out / "metrics.jsonl"
        lines = metrics.read_text().splitlines(keepends=True) if metrics.exists() else []
        if len(lines) < state["metrics_lines"]:
            raise RunDirError(f"{metrics}: {len(lines)} lines, but the checkpoint recorded {state['metrics_lines']}; "
                              "the metrics were cut short. Restore the file; refusing to resume without them")
        for i, line in enumerate(lines[: state["metrics_lines"]], start=1):
            try:
                json.loads(line)
            except ValueError:
                raise RunDirError(f"{metrics}, line {i}: not JSON; the metrics file is corrupt") from None
        if self.host is not None:
            self.host.check_ledger_heads(state.get("ledger_heads", {}))
        self.protocol.load_state_dict(state["protocol"])
        self.stopped.update(state.get("stopped", {}))
        if self.host is not None:
            self.host.load_party_states(state["parties"])
        # Drop metrics lines written after the checkpoint (a round that was cut short).
        metrics.write_text("".join(lines[: state["metrics_lines"]]))
        self._metrics_count = int(state["metrics_lines"])
        return int(state["round"]) + 1


def _private_fields(protocol: Any) -> list[str]:
    uplink = getattr(protocol, "uplink", None)
    return [] if uplink is None else [name for name, f in uplink.fields.items() if f.private]


def payload_digest(msg: Message) -> str:
    """SHA-256 over a message's payload (names, tensor dtypes, shapes and bytes): names what left, never what it
    holds."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(msg.payload):
        value = msg.payload[name]
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            for part in value if isinstance(value, list) else [value]:
                digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()
