"""securefl on Flower: a ``ServerApp`` that coordinates and a ``ClientApp`` per data owner's node.

Install with ``pip install 'securefl[flower]'``. Everything Flower-specific is
in this file; the protocols, layers and round loop are the ones the simulation
runs:

- the ServerApp runs :class:`~securefl.runtime.federation.Federation` as the
  coordinator (aggregator keys only, see :mod:`securefl.deploy.provision`),
  with :class:`~securefl.deploy.remote.RemoteParticipants` whose requests
  travel as Flower messages of type ``query.securefl``; FedH2L's peer
  messages pass through it as opaque relayed bytes;
- the ClientApp on each SuperNode answers them with a
  :class:`~securefl.deploy.node.ParticipantNode` living in the directory the
  data owner configured on that node, under the owner's policy file.

Node configuration (``flower-supernode --node-config``), set by each data owner:
``participant-id``, ``node-dir``, and optionally ``policy-file``, ``data-file`` (the owner's
table, for ``data.dataset = files``), ``public-file`` and ``test-file`` (where this machine keeps
the shared tables; every node's must be identical, which the coordinator checks), ``data-dir``
(a node reads only these paths: a config that names a path the owner did not set is refused),
``lr`` (the owner's own learning rate, which overrides the experiment config's for this
participant) and ``approval`` (``true``: take part only in a setup the owner approved with
``securefl approve``; a node that holds any approval requires one anyway).
Run configuration (``flwr run ... --run-config``), set by the coordinator:
``config`` (the experiment YAML on the coordinator), ``out`` (the coordinator's
run directory), ``timeout`` (seconds to wait for a phase's replies) and
``wait-for-nodes`` (seconds to wait for every participant's node to connect).

Every securefl value in a Flower message is bytes from :mod:`securefl.core.codec`
(no pickle): ciphertexts, masked vectors and signatures ride inside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from securefl.core.codec import decode, encode
from securefl.deploy.node import ParticipantNode
from securefl.deploy.remote import RemoteParticipants

MESSAGE_TYPE = "query.securefl"
log = logging.getLogger("securefl.flower")


class DeploymentError(RuntimeError):
    """The federation on Flower cannot start or go on (missing nodes, duplicate participants, ...)."""


# ----- the data owner's side --------------------------------------------------------------------
client_app = ClientApp()
_nodes: dict[tuple[str, str], ParticipantNode] = {}


@client_app.query("securefl")
def answer(message: Message, context: Context) -> Message:
    node = _node(context.node_config)
    request = message.content["securefl"]["request"]
    reply = node.handle(decode(request) if isinstance(request, bytes) else {"phase": "not bytes"})
    return Message(RecordDict({"securefl": ConfigRecord({"reply": encode(reply)})}), reply_to=message)


def _node(node_config: Mapping[str, Any]) -> ParticipantNode:
    """This SuperNode's participant, from the owner's node config; kept while the process lives (its state
    is on disk after every phase, so a fresh ClientApp process picks up where the last one stopped)."""
    missing = [k for k in ("participant-id", "node-dir") if not node_config.get(k)]
    if missing:
        raise DeploymentError(f"SuperNode --node-config lacks {', '.join(missing)} (e.g. --node-config "
                              "'participant-id=\"hospital_a\" node-dir=\"/srv/securefl/hospital_a\"')")
    key = (str(node_config["participant-id"]), str(node_config["node-dir"]))
    if key not in _nodes:
        _nodes[key] = ParticipantNode(key[1], key[0], policy_file=node_config.get("policy-file") or None,
                                      data_dir=node_config.get("data-dir") or None,
                                      data_file=node_config.get("data-file") or None,
                                      public_file=node_config.get("public-file") or None,
                                      test_file=node_config.get("test-file") or None,
                                      lr=node_config.get("lr"),
                                      require_approval=_yes(node_config.get("approval")))
    return _nodes[key]


def _yes(value: Any) -> bool:
    """A node-config flag: ``approval=true`` or ``approval="required"`` (strings as an operator types them)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "required")
    return bool(value)


# ----- the coordinator's side -------------------------------------------------------------------
server_app = ServerApp()


@server_app.main()
def coordinate(grid: Grid, context: Context) -> None:
    from securefl.config import load_config
    from securefl.runtime.federation import Federation

    run_config = context.run_config
    if not run_config.get("config") or not run_config.get("out"):
        raise DeploymentError("flwr run needs --run-config 'config=\"/path/experiment.yaml\" out=\"/path/run\"'")
    config = load_config(str(run_config["config"]))
    out = Path(str(run_config["out"]))
    remote = FlowerParticipants(grid, [p.id for p in config.participants],
                                timeout=float(run_config.get("timeout", 600.0)),
                                wait_for_nodes=float(run_config.get("wait-for-nodes", 120.0)))
    resume = (out / "checkpoints" / "last.pt").exists()
    summary = Federation(config, out, remote=remote, progress=False, resume=resume).run()
    log.info("securefl run finished: mean accuracy %.4f, run directory %s", summary["mean_accuracy"], out)


class FlowerParticipants(RemoteParticipants):
    """RemoteParticipants whose requests are Flower messages to the SuperNode of each participant."""

    def __init__(self, grid: Grid, participant_ids: list[str], *, timeout: float, wait_for_nodes: float) -> None:
        super().__init__(self._exchange, participant_ids)
        self.grid = grid
        self.timeout = timeout
        self.node_of: dict[str, int] = {}
        self._discover(wait_for_nodes)

    def _discover(self, wait_for_nodes: float) -> None:
        """Map participant ids to SuperNode ids by asking every connected node whom it hosts."""
        deadline = time.monotonic() + wait_for_nodes
        wanted = set(self.participant_ids)
        while True:
            node_ids = list(self.grid.get_node_ids())
            hosted: dict[str, int] = {}
            for reply in self._send({nid: encode({"phase": "hello"}) for nid in node_ids}).items():
                nid, raw = reply
                pid = decode(raw).get("participant")
                if pid in hosted and hosted[pid] != nid:
                    raise DeploymentError(f"two SuperNodes ({hosted[pid]} and {nid}) both host participant {pid!r}")
                hosted[pid] = nid
            if wanted <= set(hosted):
                self.node_of = {pid: hosted[pid] for pid in self.participant_ids}
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"after {wait_for_nodes:.0f} s no SuperNode hosts {sorted(wanted - set(hosted))} "
                                      f"(connected nodes host {sorted(hosted)})")
            time.sleep(1.0)

    def _exchange(self, requests: Mapping[str, bytes]) -> dict[str, bytes]:
        replies = self._send({self.node_of[pid]: raw for pid, raw in requests.items()})
        pid_of = {nid: pid for pid, nid in self.node_of.items()}
        return {pid_of[nid]: raw for nid, raw in replies.items() if nid in pid_of}

    def _send(self, requests: Mapping[int, bytes]) -> dict[int, bytes]:
        messages = [Message(RecordDict({"securefl": ConfigRecord({"request": raw})}), dst_node_id=nid,
                            message_type=MESSAGE_TYPE) for nid, raw in requests.items()]
        replies: dict[int, bytes] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                # A ClientApp that crashed: the node is excluded from this phase with Flower's reason.
                log.warning("node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            raw = reply.content["securefl"]["reply"]
            if isinstance(raw, bytes):  # anything else is no answer (RemoteParticipants names the node)
                replies[reply.metadata.src_node_id] = raw
        return replies
