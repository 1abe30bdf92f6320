"""The coordinator's view of participants that live on other nodes.

:class:`RemoteParticipants` has the interface of a
:class:`~securefl.runtime.host.ParticipantHost` (``prepare``, ``step``,
``update``, ``evaluate``, ``finish``), so ``Federation(..., remote=...)`` runs
the same round loop whether the participants are in-process or on the other
side of a network. Each call becomes one request per participant, encoded with
:mod:`securefl.core.codec` (no pickle), handed to an ``exchange`` function
that delivers them and returns the replies: in-process (:func:`local_exchange`,
used by tests and the isolation check) or over Flower
(:mod:`securefl.deploy.flower`).

A participant that does not answer, answers with an error, or sends a message
in someone else's name is excluded from that phase and the reason is logged
with the round, like any other rejected message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from securefl.config import ExperimentConfig
from securefl.core.codec import DecodeError, decode, decode_message, encode, encode_message
from securefl.core.message import Message
from securefl.runtime.host import HostReport

# {participant: request} -> {participant: reply}; a participant missing from the result did not answer.
Exchange = Callable[[Mapping[str, bytes]], Mapping[str, bytes]]


class RemoteSetupError(RuntimeError):
    """A node refused the run before round 1 (its reason is in the message)."""


class RemoteParticipants:
    def __init__(self, exchange: Exchange, participant_ids: Sequence[str]) -> None:
        self.exchange = exchange
        self.participant_ids = list(participant_ids)
        self.run_id = ""
        self.facts: dict[str, Any] = {}
        # Metrics that arrived with the phase before an evaluation: {round: {participant: metrics}}.
        self._metrics: dict[int, dict[str, dict[str, float]]] = {}
        self._pending_rejected: list[dict[str, str]] = []

    def connect(self, *, run_id: str, config_text: str) -> None:
        """Send every node the config; any refusal stops the run before round 1, with the node's reason."""
        self.run_id = run_id
        replies = self._call({pid: {"phase": "setup", "config": config_text} for pid in self.participant_ids})
        failures = [reply.get("error", f"node {pid!r} did not answer") for pid, reply in replies.items()
                    if not reply.get("ok")]
        if failures:
            raise RemoteSetupError("; ".join(failures))
        self._check_shared_data({pid: reply.get("shared_data") for pid, reply in replies.items()})

    @staticmethod
    def _check_shared_data(digests: Mapping[str, Any]) -> None:
        """Every node must hold the same public and test sets (a node that reads them from its own files may
        hold another version): refuse the run, naming who holds what."""
        problems = []
        for table in ("public", "test"):
            holders: dict[str, list[str]] = {}
            for pid, digest in digests.items():
                if isinstance(digest, Mapping) and isinstance(digest.get(table), str):
                    holders.setdefault(digest[table], []).append(pid)
            if len(holders) > 1:
                groups = "; ".join(f"{', '.join(sorted(pids))} hold{'s' if len(pids) == 1 else ''} {digest[:12]}…"
                                   for digest, pids in sorted(holders.items(), key=lambda kv: -len(kv[1])))
                problems.append(f"the nodes do not hold the same {table} set ({groups}): every node must read "
                                f"the same {table} table")
        if problems:
            raise RemoteSetupError("; ".join(problems))

    # ----- the ParticipantHost interface ---------------------------------------------------------------
    def prepare(self) -> HostReport:
        return self._phase({pid: {"phase": "prepare", "evaluate": 0} for pid in self.participant_ids}, evaluate=0)

    def step(self, rnd: int, inboxes: Mapping[str, Sequence[Message]]) -> HostReport:
        sampled = list(inboxes)
        return self._phase({pid: {"phase": "step", "round": rnd, "sampled": sampled,
                                  "inbox": [encode_message(m) for m in inbox]} for pid, inbox in inboxes.items()})

    def update(self, rnd: int, inboxes: Mapping[str, Sequence[Message]]) -> HostReport:
        sampled = list(inboxes)
        return self._phase({pid: {"phase": "update", "round": rnd, "sampled": sampled, "evaluate": rnd,
                                  "inbox": [encode_message(m) for m in inbox]} for pid, inbox in inboxes.items()},
                           evaluate=rnd)

    def evaluate(self, rnd: int) -> dict[str, dict[str, float]]:
        known = self._metrics.pop(rnd, {})
        self._metrics.clear()
        missing = [pid for pid in self.participant_ids if pid not in known]
        if missing:
            replies = self._call({pid: {"phase": "evaluate", "round": rnd} for pid in missing})
            known.update({pid: reply["metrics"][pid] for pid, reply in replies.items()
                          if reply.get("ok") and pid in reply.get("metrics", {})})
        # A node that cannot report is shown as such, not silently dropped from the mean.
        return {pid: {k: float(v) for k, v in known[pid].items()} if pid in known else {"unreachable": 1.0}
                for pid in self.participant_ids}

    def finish(self) -> dict[str, dict[str, Any]]:
        replies = self._call({pid: {"phase": "finish"} for pid in self.participant_ids})
        for reply in replies.values():
            if reply.get("ok"):
                self.facts.update(reply.get("facts", {}))
        return self.facts

    def close(self) -> None:
        """Nothing to release here: each node keeps its own state."""

    # ----- a layer's conversation with the nodes (masking's key agreement) -------------------------------
    def ask(self, rnd: int, sampled: Sequence[str], requests: Mapping[str, Message]) -> dict[str, Message]:
        """Deliver one layer request to each participant's node; return the answers that came back. A node
        that fails, or answers in someone else's name, is left out and the reason logged with the round."""
        replies = self._call({pid: {"phase": "layer", "round": rnd, "sampled": list(sampled),
                                    "message": encode_message(msg)} for pid, msg in requests.items()})
        answers = {}
        for pid, reply in replies.items():
            try:
                if not reply.get("ok"):
                    raise DecodeError(reply.get("error", "no reply"))
                msg = decode_message(reply.get("message", b""))
            except DecodeError as exc:
                self.reject(pid, str(exc))
                continue
            if msg.sender != pid:
                self.reject(pid, f"node of {pid!r} answered as {msg.sender!r}")
                continue
            answers[pid] = msg
        return answers

    def reject(self, sender: str, reason: str) -> None:
        """Log a refusal that happened outside a phase (it joins the next phase's report, in this round)."""
        self._pending_rejected.append({"sender": sender, "receiver": "coordinator", "reason": reason})

    # ----- plumbing ----------------------------------------------------------------------------------
    def _phase(self, requests: Mapping[str, dict[str, Any]], *, evaluate: int | None = None) -> HostReport:
        report = HostReport()
        report.rejected.extend(self._pending_rejected)
        self._pending_rejected.clear()
        for pid, reply in self._call(requests).items():
            if not reply.get("ok"):
                report.rejected.append({"sender": pid, "receiver": "coordinator",
                                        "reason": reply.get("error", "no reply")})
                continue
            if evaluate is not None and pid in reply.get("metrics", {}):
                self._metrics.setdefault(evaluate, {})[pid] = reply["metrics"][pid]
            report.rejected.extend(reply.get("rejected", []))
            report.stopped.update(reply.get("stopped", {}))
            for raw in reply.get("outgoing", []):
                try:
                    msg = decode_message(raw)
                except DecodeError as exc:
                    report.rejected.append({"sender": pid, "receiver": "coordinator",
                                            "reason": f"undecodable message: {exc}"})
                    continue
                if msg.sender != pid:
                    report.rejected.append({"sender": pid, "receiver": "coordinator",
                                            "reason": f"node of {pid!r} sent a message as {msg.sender!r}"})
                    continue
                report.outgoing.append(msg)
        return report

    def _call(self, requests: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        encoded = {pid: encode({**req, "run_id": self.run_id}) for pid, req in requests.items()}
        raw_replies = self.exchange(encoded)
        replies: dict[str, dict[str, Any]] = {}
        for pid in requests:
            raw = raw_replies.get(pid)
            if raw is None:
                replies[pid] = {"ok": False, "error": f"node {pid!r} did not answer"}
                continue
            try:
                reply = decode(raw)
                if not isinstance(reply, dict):
                    raise DecodeError("a reply is a mapping")
            except DecodeError as exc:
                reply = {"ok": False, "error": f"node {pid!r}: undecodable reply ({exc})"}
            replies[pid] = reply
        return replies


def local_exchange(nodes: Mapping[str, Any], *, fresh_process: bool = False) -> Exchange:
    """Deliver requests to in-process :class:`~securefl.deploy.node.ParticipantNode` objects, through the
    same bytes a network would carry. ``fresh_process``: rebuild each node from its directory before every
    request, as when Flower starts a new ClientApp process for every message."""

    def exchange(requests: Mapping[str, bytes]) -> dict[str, bytes]:
        replies = {}
        for pid, raw in requests.items():
            if fresh_process:
                nodes[pid].close()
            replies[pid] = encode(nodes[pid].handle(decode(raw)))
        return replies

    return exchange


def isolated_participants(config: ExperimentConfig, root: Path, *, fresh_process: bool = False,
                          require_approval: bool = False) -> tuple[RemoteParticipants, dict[str, Any]]:
    """Every participant as its own node under ``root/<id>`` (provisioned), in this process: the deployment's
    code path without the network. Returns the coordinator's view and the nodes. ``require_approval``: each
    node takes part only in a setup its owner approved (see :mod:`securefl.deploy.approval`)."""
    from securefl.deploy.node import ParticipantNode, settings_from_config

    # Each stand-in owner configures the paths the config names (a node reads no path it was not given).
    nodes = {p.id: ParticipantNode(root / p.id, p.id, policy_file=p.policy_file, require_approval=require_approval,
                                   **settings_from_config(config, p.id))
             for p in config.participants}
    return RemoteParticipants(local_exchange(nodes, fresh_process=fresh_process), list(nodes)), nodes
