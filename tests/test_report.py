"""What a run leaves for people (securefl/report.py): ``summary.json``, ``report.md``, one page per data owner
under DP, and the plots; what they say of a run with and without DP, and what they never say under DP.

Most tests write a report from metrics and facts made up here, so every number in it is known; one private run
checks the pages against its real ledgers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from securefl.privacy.ledger import read_ledger
from securefl.report import participant_report, warm_start_note, write_report
from securefl.runtime.federation import Federation, build_world
from tests.conftest import tiny_config

IDS = ["p0", "p1", "p2"]
FIRST = {"p0": 0.25, "p1": 0.5, "p2": 0.125}
FINAL = {"p0": 0.75, "p1": 0.625, "p2": 0.5}


def _row(rnd: int, accuracies: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {"round": rnd, "mean_accuracy": sum(accuracies.values()) / len(accuracies),
            "participants": {pid: {"accuracy": acc, **extra} for pid, acc in accuracies.items()}, "server": {},
            "sampled": IDS, "communication_bytes": {}, "rejected": [], "missing": []}


def _report(run: Path, config: Any, *, facts: dict[str, dict[str, Any]], stopped: dict[str, str] | None = None,
            final_server: dict[str, float] | None = None) -> dict[str, Any]:
    """A report of a two-round run whose metrics are FIRST after pre-training and FINAL at the end."""
    run.mkdir()
    final = _row(2, FINAL, loss=1.5)
    final["server"] = final_server or {}
    rows = [_row(0, FIRST), _row(1, FIRST), final]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, _, _, parties, protocol = build_world(config, "report")
    return write_report(run, config, parties, protocol, facts=facts, stopped=stopped)


def _dp_facts(epsilon: float = 1.25, **changes: Any) -> dict[str, Any]:
    return {"unit": "participant", "epsilon": epsilon, "delta": 1e-5, "target_epsilon": 8.0, "noise_multiplier": 0.8125,
            "accountant": "rdp", "budget_note": "the experiment's target", "adversary": "any observer of each release",
            **changes}


# ----- without DP -----------------------------------------------------------------------------------------------------
def test_a_run_without_dp_reports_accuracies_and_record_counts_and_no_privacy(tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = _report(run, tiny_config(), facts={pid: {"train_records": 100 + i} for i, pid in enumerate(IDS)})
    assert (summary["mean_accuracy"], summary["min_accuracy"], summary["max_accuracy"]) == (0.625, 0.5, 0.75)
    assert summary["privacy_unit"] == "none" and summary["secure_aggregation"] == "none"
    p0 = summary["participants"][0]
    assert p0 == {"id": "p0", "model": "cnn_s", "final_accuracy": 0.75, "loss": 1.5, "stopped_early": False,
                  "train_records": 100}
    assert json.loads((run / "summary.json").read_text()) == summary
    report = (run / "report.md").read_text()
    assert "| p1 | mlp_s | 101 | 0.6250 | 0.5000 |" in report  # final, and after pre-training (round 0)
    assert "- Mean test accuracy: **0.6250** (min 0.5000, max 0.7500)" in report
    assert "- Digest loss: l1" in report  # the protocol's own notes are stated
    assert "Privacy" not in report and "ε" not in report and "Server-side models" not in report
    assert (run / "accuracy.png").is_file()
    assert not (run / "privacy.png").exists() and not (run / "participants").exists()


def test_an_owners_own_learning_rate_and_the_server_models_are_stated(tmp_path: Path) -> None:
    config = tiny_config(participants=[{"id": "p0", "model": "cnn_s", "lr": 0.0125}, {"id": "p1", "model": "mlp_s"},
                                       {"id": "p2", "model": "mlp_s"}])
    summary = _report(tmp_path / "run", config, facts={}, final_server={"global_accuracy": 0.5})
    report = (tmp_path / "run" / "report.md").read_text()
    assert summary["participants"][0]["lr"] == 0.0125 and "lr" not in summary["participants"][1]
    assert "| p0 | cnn_s (own lr 0.0125) |" in report and "| p1 | mlp_s |" in report
    assert "Server-side models: global_accuracy = 0.5000" in report


# ----- with DP ----------------------------------------------------------------------------------------------------------
def test_a_private_run_reports_each_owners_spend_and_withholds_its_record_count(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = tiny_config(privacy={"unit": "participant", "target_epsilon": 8.0})
    facts = {pid: _dp_facts(epsilon=1.25 + i) for i, pid in enumerate(IDS)}
    stopped = {"p2": "round 2: p2: this release would spend ε = 9.1 of a budget of 8"}
    summary = _report(run, config, facts=facts, stopped=stopped)
    # The record counts come only from the owners' facts, which leave them out under DP.
    assert all("train_records" not in p for p in summary["participants"])
    report = (run / "report.md").read_text()
    assert "| p0 | cnn_s | withheld (DP) | 0.7500 | 0.2500 |" in report
    assert "## Privacy (participant-level DP, secure aggregation: none)" in report
    assert "| p0 | 1.250 | 8 | 1e-05 | 0.812 | no | the experiment's target |" in report
    assert "| p2 | 3.250 | 8 | 1e-05 | 0.812 | yes | the experiment's target |" in report
    assert report.count("Each ε holds against: any observer of each release") == 1  # one line per distinct adversary
    # Every owner gets a page; the ledgers are not in this directory (a deployment's nodes keep them): no plot.
    assert sorted(p.name for p in (run / "participants").iterdir()) == ["p0.md", "p1.md", "p2.md"]
    assert not (run / "privacy.png").exists()
    page = (run / "participants" / "p2.md").read_text()
    assert "- Model: deepcnn_s; training records: withheld (DP)" in page
    assert ("- ε spent: **3.250** of a budget of **8** at δ = 1e-05 (within budget); noise multiplier σ = 0.812"
            in page)
    assert f"- Stopped early: yes: {stopped['p2']}" in page
    assert "- This ε holds against: any observer of each release" in page
    assert f"`securefl audit {run}`" in page


@pytest.mark.parametrize(("epsilon", "status"), [(8.0, "within budget"), (8.0 + 1e-10, "within budget"),
                                                  (8.001, "OVER BUDGET")])
def test_a_page_says_over_budget_only_beyond_the_target(epsilon: float, status: str) -> None:
    row = {"id": "p0", "model": "mlp_s", "final_accuracy": 0.5, "stopped_early": False, **_dp_facts(epsilon)}
    run = {"protocol": "fedmd", "dataset": "digits", "rounds": 2, "seed": 0, "secure_aggregation": "masking"}
    page = participant_report(row, run, ledger="L", audit_dir="R")
    assert f"({status})" in page
    assert "- Run: fedmd on digits, 2 rounds, seed 0; secure aggregation: masking" in page


def test_a_page_without_privacy_facts_has_no_privacy_lines() -> None:
    row = {"id": "p0", "model": "mlp_s", "lr": 0.5, "final_accuracy": 0.5, "stopped_early": False, "train_records": 7}
    run = {"protocol": "fedmd", "dataset": "digits", "rounds": 2, "seed": 0, "secure_aggregation": "none"}
    page = participant_report(row, run, ledger="L", audit_dir="R")
    assert "- Model: mlp_s (own lr 0.5); training records: 7" in page
    assert "ε" not in page and "audit" not in page


# ----- the warm start ---------------------------------------------------------------------------------------------------
def test_every_report_says_how_round_one_starts() -> None:
    def note(**changes: Any) -> dict[str, str]:
        config = tiny_config(**changes)
        return warm_start_note(config, build_world(config, "report")[4])

    assert note() == {"warm start": "fedmd's own step 0 (an early-stopped local fit)"}
    assert note(protocol="fml", training={"warm_start": True, "warm_start_max_epochs": 7, "warm_start_patience": 2}) == {
        "warm start": "each owner's model fitted alone first, early-stopped on its validation split (at most 7 "
                      "epochs, patience 2)"}
    assert note(protocol="fml") == {}


# ----- a real private run ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def private_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("private") / "run"
    Federation(tiny_config(run={"rounds": 1}, privacy={"unit": "participant", "target_epsilon": 8.0}), run,
               progress=False).run()
    return run


def test_a_private_runs_pages_state_what_its_ledgers_hold(private_run: Path) -> None:
    summary = json.loads((private_run / "summary.json").read_text())
    assert (private_run / "privacy.png").is_file()  # the ledgers are here: ε over rounds is plotted
    for row in summary["participants"]:
        ledger = private_run / "ledgers" / f"{row['id']}.jsonl"
        spent = read_ledger(ledger).entries[-2]["epsilon_after"]  # the last release, before the seal
        assert row["epsilon"] == pytest.approx(spent)
        page = (private_run / "participants" / f"{row['id']}.md").read_text()
        assert f"- ε spent: **{row['epsilon']:.3f}** of a budget of **8**" in page
        assert f"- Ledger: `{private_run}/ledgers/{row['id']}.jsonl`" in page
        assert "training records: withheld (DP)" in page and "train_records" not in row
