"""Finding 7 of issue 19, played by the coordinator and by a reader of the run directory: exact record counts.

An exact record count is private under DP (one record more or less changes it) and no ledger books it. In the
reference set-ups it leaves every round as ``num_samples`` metadata (FedAvg's default weighting, FML's
``weighting: samples``, FedGen reference mode's weighted head mean), and at the end in what each node reports to
the coordinator (``train_records``), which lands in ``summary.json`` and the reports. Under DP: no counts, and a
weighting that needs them is refused before round 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.adversary.wiretap import Wiretap, run_or_refusal
from tests.conftest import tiny_config

SAME_MODELS = [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]
RECORD_DP = {"unit": "record", "target_epsilon": 8.0}
WEIGHTED = {
    "fedavg": ({}, "fedavg.weighting"),  # FedAvg weights by records by default
    "fml": ({"fml": {"weighting": "samples", "meme_model": "mlp_s", "batch_size": 32}}, "fml.weighting"),
    "fedgen": ({"fedgen": {"mode": "reference", "local_steps": 2, "generator_steps": 2}}, "fedgen.head_aggregation"),
}


@pytest.mark.parametrize("protocol", list(WEIGHTED))
def test_the_coordinator_reads_no_record_count_off_the_uplink_under_dp(tmp_path: Path, protocol: str) -> None:
    changes, setting = WEIGHTED[protocol]
    config = tiny_config(protocol=protocol, participants=SAME_MODELS, run={"rounds": 1}, privacy=RECORD_DP, **changes)
    tap = Wiretap()
    fed, refusal = run_or_refusal(config, tmp_path / "run", tap)
    if fed is not None:
        truth = {p.id: p.num_samples for p in fed.parties}
        exact = {m.sender: m.meta["num_samples"] for m in tap.uplinks() if m.meta.get("num_samples") == truth[m.sender]}
        assert not exact, f"{protocol} under DP: the coordinator read the exact record counts {exact}"
    assert refusal is not None and setting in refusal
    assert not (tmp_path / "run").exists()


def test_the_run_directory_and_the_node_reports_hold_no_record_count_under_dp(tmp_path: Path) -> None:
    reported: dict = {}

    def tap_reports(fed):  # type: ignore[no-untyped-def]
        # What the participants' host reports to the coordinator at the end (on a deployment: each node's facts).
        finish = fed.participants.finish
        fed.participants.finish = lambda: reported.update(finish()) or reported

    fed, refusal = run_or_refusal(tiny_config(protocol="fml", run={"rounds": 1}, privacy=RECORD_DP),
                                  tmp_path / "run", Wiretap(), before_run=tap_reports)
    assert refusal is None and fed is not None
    counts = {p.id: p.num_samples for p in fed.parties}
    assert set(reported) == set(counts)
    leaked_facts = {pid: f["train_records"] for pid, f in reported.items() if "train_records" in f}
    assert not leaked_facts, f"the nodes reported their exact record counts {leaked_facts} to the coordinator"
    # What a reader of the run directory finds.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    leaked = {p["id"]: p["train_records"] for p in summary["participants"] if "train_records" in p}
    assert not leaked, f"summary.json holds the exact record counts {leaked}"
    for pid, n in counts.items():
        page = (tmp_path / "run" / "participants" / f"{pid}.md").read_text()
        assert f"training records: {n}" not in page
        assert f"| {pid} | " in (tmp_path / "run" / "report.md").read_text()
        assert not any(line.startswith(f"| {pid} |") and f"| {n} |" in line
                       for line in (tmp_path / "run" / "report.md").read_text().splitlines())


def test_uniform_fedavg_runs_under_dp_and_sends_no_count(tmp_path: Path) -> None:
    """The setting the refusal names (``fedavg.weighting: uniform``) runs, and no uplink carries a count."""
    config = tiny_config(protocol="fedavg", participants=SAME_MODELS, run={"rounds": 1}, privacy=RECORD_DP,
                         fedavg={"weighting": "uniform"})
    tap = Wiretap()
    fed, refusal = run_or_refusal(config, tmp_path / "run", tap)
    assert refusal is None and fed is not None
    assert tap.uplinks() and all("num_samples" not in m.meta and "aggregation_weight" not in m.meta
                                 for m in tap.uplinks())
