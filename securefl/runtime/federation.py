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
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from securefl.config import ConfigError, DirichletPartition, ExplicitPartition, ShardPartition, dump_config
from securefl.data.datasets import Dataset, load_dataset
from securefl.data.partition import (
    FederatedSplit,
    PartySplit,
    carve_public,
    dirichlet_partition,
    explicit_partition,
    shard_partition,
    stratified_sample,
    train_val_split,
)
from securefl.layers.base import Layer, Rejected
from securefl.protocols import Protocol, get_protocol
from securefl.protocols.base import Downlink
from securefl.runtime.aggregator import PlainAggregator
from securefl.runtime.message import AGGREGATOR, BROADCAST, Message
from securefl.runtime.party import DataView, FederationContext, Party, derive_seed
from securefl.runtime.privacy import PrivacyRuntime
from securefl.runtime.transport import InProcessTransport, Transport

CHECKPOINT = "checkpoints/last.pt"


class RunDirError(ValueError):
    """The output directory cannot be used as asked (e.g. it holds a run and --resume was not given)."""


def build_split(config: Any, dataset: Dataset) -> FederatedSplit:
    """Public set and private silos, deterministic in ``run.seed``."""
    data, seed, n_parties = config.data, config.run.seed, len(config.participants)
    labels = dataset.y_train.numpy()
    pool = np.arange(len(labels))
    if data.max_train_records is not None and data.max_train_records < len(pool):
        pool = np.sort(stratified_sample(labels, data.max_train_records, np.random.default_rng(derive_seed(seed, "subsample"))))
    all_classes = tuple(range(dataset.num_classes))
    private_classes = tuple(data.private_classes or all_classes)
    public_classes = tuple(data.public_classes or all_classes)
    for name, classes in (("private_classes", private_classes), ("public_classes", public_classes)):
        bad = [c for c in classes if c not in all_classes]
        if bad:
            raise ConfigError(f"data.{name} = {bad}: classes must be in 0..{dataset.num_classes - 1}")
    public_pool = pool[np.isin(labels[pool], public_classes)]
    public, _ = carve_public(labels, public_pool, data.public_size, derive_seed(seed, "public"))
    private_pool = np.setdiff1d(pool[np.isin(labels[pool], private_classes)], public)

    partition = data.partition
    if isinstance(partition, DirichletPartition):
        silos = dirichlet_partition(labels, private_pool, n_parties, alpha=partition.alpha,
                                    seed=derive_seed(seed, "partition"), min_size=partition.min_size)
    elif isinstance(partition, ShardPartition):
        silos = shard_partition(labels, private_pool, n_parties, classes_per_party=partition.classes_per_party,
                                seed=derive_seed(seed, "partition"))
    elif isinstance(partition, ExplicitPartition):
        silos = explicit_partition(private_pool, partition.assignment)
    else:
        shuffled = np.random.default_rng(derive_seed(seed, "partition")).permutation(private_pool)
        silos = [np.sort(s) for s in np.array_split(shuffled, n_parties)]

    parties = tuple(train_val_split(s, data.val_fraction, derive_seed(seed, "val", i)) for i, s in enumerate(silos))
    # A labelled public set gets its own validation split, for early stopping of transfer learning.
    if data.public_labelled and len(public) > 0:
        public_split = train_val_split(public, 0.1, derive_seed(seed, "public-val"))
    else:
        public_split = PartySplit(train=public, val=np.empty(0, dtype=np.int64))
    return FederatedSplit(public=public_split.train, public_val=public_split.val, parties=parties,
                          private_classes=private_classes, public_classes=public_classes)


@dataclass
class RoundRecord:
    round: int
    sampled: list[str]
    participants: dict[str, dict[str, float]]
    server: dict[str, float]
    communication_bytes: dict[str, int]
    elapsed_s: float
    rejected: list[dict[str, str]]

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
            "elapsed_s": round(self.elapsed_s, 3),
        }


class Federation:
    """One experiment: build everything from a validated config, run the rounds, write the run dir."""

    def __init__(self, config: Any, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 transport: Transport | None = None,
                 on_round_end: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.transport = transport or InProcessTransport()
        self.on_round_end = on_round_end
        self._prepare_run_dir(resume)

        seed = config.run.seed
        self.dataset = load_dataset(config.data.dataset, seed=seed, data_dir=config.data.data_dir)
        self.split = build_split(config, self.dataset)
        self.ctx = self._build_context()
        self.parties = [
            Party(id=p.id, index=i, model_name=p.model,
                  train=self._view(self.split.parties[i].train), val=self._view(self.split.parties[i].val))
            for i, p in enumerate(config.participants)
        ]
        protocol_cls = get_protocol(config.protocol)
        self.protocol: Protocol = protocol_cls(config.protocol_config(), self.ctx)
        self.aggregator = PlainAggregator()
        # Refuse impossible set-ups before any training.
        self.protocol.validate_participants(self.parties)
        self._rejected: list[dict[str, str]] = []
        self.stopped: dict[str, str] = {}
        self._current_round = 0
        self._keys: dict[str, Any] = {}
        for party in self.parties:
            with _seeded(derive_seed(seed, "setup", party.id)):
                self.protocol.setup_party(party)
        # One ledger per data owner for the whole run, owned here and never re-created mid-run.
        self.privacy = PrivacyRuntime.build(self) if config.privacy.unit != "none" else None
        self.layers: list[Layer] = self._build_layers()
        for layer in self.layers:
            layer.check(self.protocol, self.parties)

    # ----- set-up ------------------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> None:
        checkpoint = self.out / CHECKPOINT
        config_text = dump_config(self.config)
        if resume:
            if not checkpoint.exists():
                raise RunDirError(f"{self.out}: --resume given but there is no checkpoint ({checkpoint})")
            saved = (self.out / "config.yaml").read_text()
            if saved != config_text:
                raise RunDirError(
                    f"{self.out}/config.yaml differs from the config given to --resume; resume with the same "
                    "config (and --set overrides) as the original run"
                )
            self.run_id = json.loads((self.out / "run.json").read_text())["run_id"]
            return
        if checkpoint.exists() or (self.out / "metrics.jsonl").exists():
            raise RunDirError(
                f"{self.out} already holds a run; use --resume to continue it or choose another --out "
                "(securefl never overwrites a run, its ledgers or its checkpoints)"
            )
        (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.run_id = self.config.run.name or uuid.uuid4().hex[:12]
        (self.out / "config.yaml").write_text(config_text)
        (self.out / "run.json").write_text(json.dumps(self._run_info(), indent=2) + "\n")

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

    def _build_layers(self) -> list[Layer]:
        """The middleware stack, in outbound order: DP, then sealing, then signing."""
        cfg = self.config
        key_dir = self.out / "keys"
        layers: list[Layer] = []
        if self.privacy is not None and self.privacy.layer is not None:
            layers.append(self.privacy.layer)
        if cfg.secure_aggregation == "ckks":
            from securefl.layers.secure_aggregation import CkksLayer

            layers.append(CkksLayer(cfg.ckks, key_dir=key_dir))
        elif cfg.secure_aggregation == "masking":
            from securefl.layers.secure_aggregation import MaskingLayer

            layers.append(MaskingLayer(run_id=self.run_id, threshold_fraction=cfg.masking.threshold_fraction))
        if cfg.signing:
            from securefl.layers.signing import SigningLayer

            ids = [p.id for p in self.parties] + [AGGREGATOR]
            layers.append(SigningLayer(run_id=self.run_id, keys={pid: self.party_keys(pid) for pid in ids}))
        return layers

    def party_keys(self, party_id: str) -> Any:
        """A party's Ed25519 keys (messages and ledger seal), from its key directory."""
        if party_id not in self._keys:
            from securefl.crypto.keystore import load_or_create_party_keys

            self._keys[party_id] = load_or_create_party_keys(self.out / "keys", party_id)
        return self._keys[party_id]

    def _view(self, idx: np.ndarray) -> DataView:
        return DataView(self.dataset.x_train, self.dataset.y_train, torch.as_tensor(idx, dtype=torch.long))

    def _build_context(self) -> FederationContext:
        data = self.config.data
        test_mask = torch.isin(self.dataset.y_test, torch.as_tensor(self.split.private_classes))
        eval_classes = None
        if data.private_classes:
            eval_classes = torch.as_tensor(sorted(self.split.private_classes))
        return FederationContext(
            run_id=self.run_id, seed=self.config.run.seed, dataset=self.dataset, split=self.split,
            training=self.config.training, public=self._view(self.split.public),
            public_val=self._view(self.split.public_val), public_labelled=data.public_labelled,
            test_x=self.dataset.x_test[test_mask], test_y=self.dataset.y_test[test_mask], eval_classes=eval_classes,
            rounds=self.config.run.rounds,
        )

    # ----- the run -----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.config
        start_round = self._restore() if (self.out / CHECKPOINT).exists() else None
        if start_round is None:
            for party in self.parties:
                with _seeded(derive_seed(cfg.run.seed, "prepare", party.id)), self._budget_guard(party.id):
                    self.protocol.prepare_party(party)
            self._log(self._evaluate(0, sampled=[], elapsed=0.0))
            self._checkpoint(0)
            start_round = 1
        sampled_per_round = self._n_sampled()
        total = (cfg.run.rounds - start_round + 1) * sampled_per_round
        bar = tqdm(total=total, disable=not self.progress, unit="step", desc=f"{cfg.protocol}", leave=False)
        try:
            for rnd in range(start_round, cfg.run.rounds + 1):
                t0 = time.perf_counter()
                self._current_round = rnd
                sampled = self.sample(rnd)
                if not sampled:
                    break  # every participant has spent its budget
                self._round(rnd, sampled, bar)
                if rnd % cfg.run.eval_every == 0 or rnd == cfg.run.rounds:
                    record = self._evaluate(rnd, sampled, time.perf_counter() - t0)
                    self._log(record)
                    mean = record.to_json()["mean_accuracy"]
                    bar.set_postfix_str(f"round {rnd}/{cfg.run.rounds} mean acc {mean:.3f}")
                self._checkpoint(rnd)
                if self.on_round_end is not None:
                    self.on_round_end(rnd)
            if self.privacy is not None:
                self.privacy.seal_all()
            from securefl.report import write_report

            return write_report(self.out, self.config, self.parties, self.protocol, privacy=self.privacy,
                                stopped=self.stopped)
        finally:
            bar.close()
            if self.privacy is not None:
                self.privacy.close_all()

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
        return max(1, int(round(self.config.run.participation * len(self.parties))))

    def _round(self, rnd: int, sampled: Sequence[str], bar: tqdm) -> None:
        seed = self.config.run.seed
        by_id = {p.id: p for p in self.parties}
        for layer in self.layers:
            layer.start_round(rnd, sampled)
        self._deliver(self.protocol.open_round(rnd, sampled), sampled)
        outgoing: list[Message] = []
        for pid in sampled:
            party = by_id[pid]
            inbox = self._receive(party)
            with _seeded(derive_seed(seed, "client_step", rnd, pid)), self._budget_guard(pid):
                replies = self.protocol.client_step(party, inbox, rnd)
                sealed = []
                for reply in _as_list(replies):
                    # Messages to the aggregator are checked against the declared uplink; peer-to-peer
                    # messages (decentralised protocols) go straight to the peer's inbox.
                    if reply.receiver == AGGREGATOR and self.protocol.uplink is not None:
                        self.protocol.uplink.check(reply)
                    for layer in self.layers:
                        reply = layer.outbound(reply, party)
                    sealed.append(reply)
                # Only once every release of this step is booked does anything leave the participant.
                outgoing.extend(sealed)
            bar.update(1)
        # Sampled parties step concurrently in a deployment: send only after all have stepped, so a
        # peer-to-peer message never lands in a later peer's client_step inbox instead of its client_update.
        for reply in outgoing:
            self.transport.send(reply)
        replies = []
        for msg in self.transport.receive(AGGREGATOR):
            try:
                for layer in reversed(self.layers):
                    msg = layer.server_inbound(msg)
                replies.append(msg)
            except Rejected as rejection:
                self._reject(rejection, receiver=AGGREGATOR)
        aggregator = self.aggregator
        for layer in self.layers:
            aggregator = layer.wrap_aggregator(aggregator, rnd)
        with _seeded(derive_seed(seed, "server_step", rnd)):
            downlink = self.protocol.server_step(rnd, replies, aggregator) if replies else None
        self._deliver(downlink, sampled)
        for pid in sampled:
            inbox = self._receive(by_id[pid])
            if inbox and pid not in self.stopped:
                with _seeded(derive_seed(seed, "client_update", rnd, pid)), self._budget_guard(pid):
                    self.protocol.client_update(by_id[pid], inbox, rnd)

    def _receive(self, party: Party) -> list[Message]:
        """A participant's inbox after its inbound layers (verify, then open); rejections are logged."""
        accepted = []
        for msg in self.transport.receive(party.id):
            try:
                for layer in reversed(self.layers):
                    msg = layer.inbound(msg, party)
                accepted.append(msg)
            except Rejected as rejection:
                self._reject(rejection, receiver=party.id)
        return accepted

    @contextlib.contextmanager
    def _budget_guard(self, party_id: str) -> Iterator[None]:
        """A refused release (budget exhausted) stops that participant; the run goes on without it."""
        from securefl.privacy.errors import BudgetExceeded

        try:
            yield
        except BudgetExceeded as exc:
            self.stopped[party_id] = f"round {self._current_round}: {exc}"

    def _reject(self, rejection: Rejected, *, receiver: str) -> None:
        self._rejected.append({"sender": rejection.sender, "receiver": receiver, "reason": rejection.reason})

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
                for msg in _as_list(msgs):
                    self._send_from_server(msg.model_copy(update={"receiver": pid}))

    def _evaluate(self, rnd: int, sampled: Sequence[str], elapsed: float) -> RoundRecord:
        seed = self.config.run.seed
        per_party = {}
        for party in self.parties:
            with _seeded(derive_seed(seed, "evaluate", rnd, party.id)):
                per_party[party.id] = {k: float(v) for k, v in self.protocol.evaluate(party).items()}
        counters = getattr(self.transport, "bytes_by_kind", {})
        record = RoundRecord(round=rnd, sampled=list(sampled), participants=per_party,
                             server={k: float(v) for k, v in self.protocol.evaluate_server().items()},
                             communication_bytes=dict(counters), elapsed_s=elapsed, rejected=list(self._rejected))
        self._rejected.clear()
        if hasattr(self.transport, "reset_counters"):
            self.transport.reset_counters()
        return record

    # ----- persistence -------------------------------------------------------------------
    def _log(self, record: RoundRecord) -> None:
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record.to_json()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _metrics_lines(self) -> int:
        path = self.out / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def _checkpoint(self, rnd: int) -> None:
        state = {
            "round": rnd,
            "run_id": self.run_id,
            "metrics_lines": self._metrics_lines(),
            "protocol": self.protocol.state_dict(),
            "stopped": dict(self.stopped),
            "parties": {p.id: self.protocol.party_state(p) for p in self.parties},
        }
        path = self.out / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        # Atomic replace: a crash leaves either the old or the new checkpoint, never half of one.
        os.replace(tmp, path)

    def _restore(self) -> int:
        path = self.out / CHECKPOINT
        try:
            state = torch.load(path, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise RunDirError(f"{path}: checkpoint is corrupt or truncated ({type(exc).__name__}); "
                              "refusing to start over silently") from None
        self.protocol.load_state_dict(state["protocol"])
        self.stopped = dict(state.get("stopped", {}))
        for party in self.parties:
            self.protocol.load_party_state(party, state["parties"][party.id])
        # Drop metrics lines written after the checkpoint (a round that was cut short).
        metrics = self.out / "metrics.jsonl"
        lines = metrics.read_text().splitlines(keepends=True) if metrics.exists() else []
        metrics.write_text("".join(lines[: state["metrics_lines"]]))
        return int(state["round"]) + 1


def _as_list(messages: Message | Sequence[Message] | None) -> list[Message]:
    if messages is None:
        return []
    return [messages] if isinstance(messages, Message) else list(messages)


class _seeded:
    """Seed torch's global RNG for one step, restoring the outer state afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng()
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)
