"""Finding 13, as the network (or the coordinator): replay a captured signed message to a fresh node process; and
two runs of the same name must not share a run id.

Flower may start a new ClientApp process for every message, so a node's memory of what it accepted dies with
each request. The attacker records the bytes of a ``step`` request whose inbox holds the aggregator's signed
downlink, and delivers them again to a freshly started node: the node must refuse it as a replay (before it
rewinds, trains or releases anything), from the record it keeps in its node directory.

Run ids: signatures, replay records and node directories tell runs apart by their id. Two runs named alike
must get different ids, or a message of one run would verify in the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from securefl.core.codec import decode
from securefl.deploy.provision import provision
from securefl.deploy.remote import RemoteParticipants, isolated_participants
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config


def test_a_captured_message_replayed_to_a_fresh_node_process_is_refused(tmp_path: Path) -> None:
    same_models = [{"id": f"p{i}", "model": "cnn_s"} for i in range(3)]
    config = tiny_config(protocol="fedavg", participants=same_models, run={"rounds": 2})
    remote, nodes = isolated_participants(config, tmp_path / "nodes", fresh_process=True)
    provision(config, coordinator_dir=tmp_path / "coordinator",
              node_dirs={pid: tmp_path / "nodes" / pid for pid in nodes})
    captured: dict[str, bytes] = {}

    def wiretap(requests: Mapping[str, bytes]) -> Mapping[str, bytes]:
        """The network between the coordinator and the nodes: it keeps a copy of p0's requests."""
        raw = requests.get("p0")
        if raw is not None:
            request = decode(raw)
            if request.get("phase") in ("step", "update") and request.get("inbox"):
                captured.setdefault(f"{request['phase']}-{request['round']}", raw)
        return remote.exchange(requests)

    Federation(config, tmp_path / "coordinator", progress=False,
               remote=RemoteParticipants(wiretap, remote.participant_ids)).run()
    # FedAvg's signed downlink (the new global model) reaches a node in its update request.
    assert "update-1" in captured and "update-2" in captured, sorted(captured)

    # The last one again (the same round the node saw last), and an older one (which would roll the node's model
    # back to round 1's global model): each to a fresh node process, as Flower would start.
    for name, refusal in (("update-2", "replay"), ("update-1", "replay|stale")):
        nodes["p0"].close()  # a fresh ClientApp process: nothing in memory
        reply = nodes["p0"].handle(decode(captured[name]))
        reasons = [reply.get("error", "")] + [r["reason"] for r in reply.get("rejected", [])]
        refused = any(word in reason for reason in reasons for word in refusal.split("|"))
        assert not (reply.get("ok") and not refused), \
            f"the replayed {name} request was accepted by a fresh node process: {reply}"
        assert refused, reply
        assert not reply.get("outgoing"), f"the replayed {name} request made the node release something"
    assert "replay" in nodes["p0"].handle(decode(captured["update-2"])).get("error", "")


def test_two_runs_with_the_same_name_get_different_run_ids(tmp_path: Path) -> None:
    config = tiny_config(run={"rounds": 1, "name": "trial"})
    first = Federation(config, tmp_path / "a", progress=False)
    second = Federation(config, tmp_path / "b", progress=False)
    try:
        assert first.run_id != second.run_id, f"both runs have run id {first.run_id!r}"
        assert first.run_id.startswith("trial") and second.run_id.startswith("trial")
    finally:
        first.release_run_dir()
        second.release_run_dir()
