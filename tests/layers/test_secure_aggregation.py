"""Secure aggregation composed at the call site: same results, sealed wire, refusals before round 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from securefl.crypto.ckks import SecretKeyRequired
from securefl.crypto.errors import SecAggAbort
from securefl.crypto.sealed import SealedTensor
from securefl.layers.base import LayerSetupError
from securefl.layers.secure_aggregation import CkksLayer
from securefl.runtime.federation import Federation
from securefl.runtime.message import AGGREGATOR
from tests.conftest import metrics_without_time, tiny_config
from tests.layers.faults import FaultyTransport
from tests.protocols.contract import RecordingTransport


def _accuracies(run: Path) -> list[float]:
    return [row["mean_accuracy"] for row in metrics_without_time(run)]


@pytest.mark.parametrize("scheme", ["ckks", "masking"])
def test_fedmd_under_secure_aggregation_matches_plaintext(scheme: str, tmp_path: Path) -> None:
    plain = Federation(tiny_config(), tmp_path / "plain", progress=False).run()
    transport = RecordingTransport()
    secure = Federation(tiny_config(secure_aggregation=scheme), tmp_path / scheme, progress=False,
                        transport=transport).run()
    assert abs(secure["mean_accuracy"] - plain["mean_accuracy"]) < 0.02
    # On the wire every logits reply is sealed: bytes chunks plus meta, no plaintext tensor.
    uplinks = [m for m in transport.sent if m.receiver == AGGREGATOR]
    assert uplinks
    for msg in uplinks:
        assert not isinstance(msg.payload["logits"], torch.Tensor)
        assert SealedTensor.from_message(msg, "logits").scheme == {"ckks": "ckks", "masking": "secagg"}[scheme]


def test_ckks_aggregator_holds_no_secret_key_and_cannot_decrypt(tmp_path: Path) -> None:
    fed = Federation(tiny_config(secure_aggregation="ckks"), tmp_path / "run", progress=False)
    layer = next(layer for layer in fed.layers if isinstance(layer, CkksLayer))
    aggregator = layer.wrap_aggregator(fed.aggregator, 1)
    assert not aggregator.ctx.holds_secret_key
    sealed = layer._keys.seal(torch.ones(8), field="x")
    with pytest.raises(SecretKeyRequired):
        aggregator.ctx.open(sealed)
    # The raw TenSEAL context behind it refuses too.
    enc = aggregator.ctx.tenseal_context
    assert not enc.has_secret_key()


def test_consensus_downlink_is_sealed_until_the_participant_opens_it(tmp_path: Path) -> None:
    transport = RecordingTransport()
    fed = Federation(tiny_config(secure_aggregation="ckks", run={"rounds": 1}), tmp_path / "run", progress=False,
                     transport=transport)
    fed.run()
    downs = [m for m in transport.sent if m.kind == "consensus"]
    assert downs and all(not isinstance(m.payload["consensus"], torch.Tensor) for m in downs)


@pytest.mark.parametrize("scheme", ["ckks", "masking"])
def test_fedgen_reference_mode_is_refused_before_round_one(scheme: str, tmp_path: Path) -> None:
    cfg = tiny_config(protocol="fedgen", secure_aggregation=scheme, fedgen={"mode": "reference"})
    with pytest.raises(LayerSetupError, match="individually"):
        Federation(cfg, tmp_path / "run", progress=False)


def test_ckks_refuses_a_server_that_reads_aggregates_and_masking_accepts_it(tmp_path: Path) -> None:
    same = {"participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]}
    with pytest.raises(LayerSetupError, match="cannot decrypt"):
        Federation(tiny_config(protocol="fedavg", secure_aggregation="ckks", **same), tmp_path / "a", progress=False)
    plain = Federation(tiny_config(protocol="fedavg", **same), tmp_path / "b", progress=False).run()
    masked = Federation(tiny_config(protocol="fedavg", secure_aggregation="masking", **same), tmp_path / "c",
                        progress=False).run()
    assert abs(plain["mean_accuracy"] - masked["mean_accuracy"]) < 1e-3


TEN = {"participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(10)], "run": {"rounds": 1},
       "data": {"partition": {"kind": "dirichlet", "alpha": 100.0}}}


def test_masking_recovers_two_of_ten_dropouts_after_key_sharing(tmp_path: Path) -> None:
    dropped = {"p3", "p7"}
    transport = FaultyTransport(lambda m: m.receiver == AGGREGATOR and m.sender in dropped, lambda m: [])
    fed = Federation(tiny_config(secure_aggregation="masking", **TEN), tmp_path / "run", progress=False,
                     transport=transport)
    captured = {}
    real_step = fed.protocol.server_step

    def spy(rnd, replies, aggregator):  # type: ignore[no-untyped-def]
        down = real_step(rnd, replies, aggregator)
        captured["consensus"] = down.tensor("consensus")
        captured["senders"] = sorted(r.sender for r in replies)
        return down

    fed.protocol.server_step = spy  # type: ignore[method-assign]
    plaintext = {}
    real_client_step = fed.protocol.client_step

    def record(party, inbox, rnd):  # type: ignore[no-untyped-def]
        reply = real_client_step(party, inbox, rnd)
        plaintext[party.id] = reply.tensor("logits")
        return reply

    fed.protocol.client_step = record  # type: ignore[method-assign]
    fed.run()
    assert transport.injected == 2
    assert captured["senders"] == sorted({f"p{i}" for i in range(10)} - dropped)
    # The recovered consensus is the mean of the survivors' plaintext logits (fixed point: 2^-24 steps).
    expected = torch.stack([t for pid, t in plaintext.items() if pid not in dropped]).mean(0)
    torch.testing.assert_close(captured["consensus"].float(), expected, atol=1e-6, rtol=0)


def test_masking_below_threshold_aborts_cleanly_with_no_partial_result(tmp_path: Path) -> None:
    dropped = {f"p{i}" for i in range(5)}  # 5 survivors of 10, threshold 7
    transport = FaultyTransport(lambda m: m.receiver == AGGREGATOR and m.sender in dropped, lambda m: [])
    fed = Federation(tiny_config(secure_aggregation="masking", **TEN), tmp_path / "run", progress=False,
                     transport=transport)
    with pytest.raises(SecAggAbort, match="threshold|survivors"):
        fed.run()
    assert not (tmp_path / "run" / "summary.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0]  # nothing from the aborted round was recorded
