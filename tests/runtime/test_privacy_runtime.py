"""Privacy wired into the runtime: ledgers per owner, budgets enforced, audit, resume, policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from securefl.cli import main
from securefl.privacy.dp_sgd import DPSGDTrainer
from securefl.runtime.federation import Federation
from tests.conftest import Crash, crash_after_round, metrics_without_time, tiny_config

RECORD = {"privacy": {"unit": "record", "delta": 1e-5},
          "participants": [{"id": "p0", "model": "cnn_s", "target_epsilon": 1.0},
                           {"id": "p1", "model": "mlp_s", "target_epsilon": 4.0},
                           {"id": "p2", "model": "mlp_s", "target_epsilon": 8.0}],
          "training": {"optimizer": "sgd", "lr": 0.05}}


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_record_level_run_ends_under_every_target_and_the_audit_passes(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    fed = Federation(tiny_config(**RECORD), tmp_path / "run", progress=False)
    assert all(isinstance(p.trainer, DPSGDTrainer) for p in fed.parties)
    # Different targets give different noise: the strictest owner gets the most.
    sigmas = [fed.privacy.participants[p].noise_multiplier for p in ("p0", "p1", "p2")]
    assert sigmas[0] > sigmas[1] > sigmas[2]
    summary = fed.run()
    for p in summary["participants"]:
        assert 0 < p["epsilon"] <= p["target_epsilon"], p
        assert p["unit"] == "record" and p["delta"] == 1e-5 and p["stopped_early"] is False
    assert (tmp_path / "run" / "privacy.png").is_file()
    assert main(["audit", str(tmp_path / "run")]) == 0
    assert "OK" in capsys.readouterr().out
    # The ledger says explicitly that the digest on public data spent nothing.
    lines = [json.loads(x) for x in (tmp_path / "run" / "ledgers" / "p0.jsonl").read_text().splitlines()]
    assert any(e.get("mechanism") == "none" and e.get("payload") == "digest" for e in lines)
    assert lines[-1]["kind"] == "seal"


def test_editing_deleting_or_reordering_a_ledger_line_fails_the_audit(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    Federation(tiny_config(**RECORD, run={"rounds": 1}), tmp_path / "run", progress=False).run()
    ledger = tmp_path / "run" / "ledgers" / "p1.jsonl"
    original = ledger.read_text().splitlines(keepends=True)

    def edited(lines: list[str]) -> int:
        ledger.write_text("".join(lines))
        code = main(["audit", str(tmp_path / "run")])
        ledger.write_text("".join(original))
        return code

    release = next(i for i, line in enumerate(original) if json.loads(line)["kind"] == "release")
    entry = json.loads(original[release])
    entry["steps"] = max(1, entry["steps"] // 2)  # claim half the DP-SGD steps that were taken
    bumped = original[:]
    bumped[release] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    assert edited(bumped) != 0
    assert edited(original[:2] + original[3:]) != 0
    assert edited([original[0], original[2], original[1], *original[3:]]) != 0
    assert main(["audit", str(tmp_path / "run")]) == 0
    capsys.readouterr()


def test_a_participant_that_would_overspend_stops_and_the_run_goes_on(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from securefl.protocols.fedmd import FedMD

    real_plan = FedMD.private_training_plan
    # Under-plan p0's training so that its calibrated noise is too small for what the run really does.
    monkeypatch.setattr(FedMD, "private_training_plan",
                        lambda self, party: [(b, 1, s) for b, _, s in real_plan(self, party)] if party.id == "p0"
                        else real_plan(self, party))
    summary = Federation(tiny_config(**RECORD, run={"rounds": 3}), tmp_path / "run", progress=False).run()
    by_id = {p["id"]: p for p in summary["participants"]}
    assert by_id["p0"]["stopped_early"] is True and "budget" in by_id["p0"]["stopped_reason"].lower()
    assert by_id["p0"]["epsilon"] <= by_id["p0"]["target_epsilon"]
    assert not by_id["p1"]["stopped_early"] and not by_id["p2"]["stopped_early"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "p0" not in rows[-1]["sampled"] and {"p1", "p2"} <= set(rows[-1]["sampled"])
    assert main(["audit", str(tmp_path / "run")]) == 0


def test_resume_keeps_the_ledger_and_never_under_counts(tmp_path: Path) -> None:
    """DP noise and Poisson samples are secret (OS entropy), so a resumed DP run is the uninterrupted one in
    distribution only, not bit for bit. What must hold: the ledger survives the crash, ends with at least the
    spend of the uninterrupted run, stays within every target, and verifies."""
    cfg = tiny_config(**RECORD, run={"rounds": 3})
    Federation(cfg, tmp_path / "full", progress=False).run()
    cut = Federation(cfg, tmp_path / "cut", progress=False, on_round_end=crash_after_round(1))
    ledgers_before = {pid: pp.ledger for pid, pp in cut.privacy.participants.items()}
    with pytest.raises(Crash):
        cut.run()
    spent_at_crash = {pid: ledger.epsilon("record") for pid, ledger in ledgers_before.items()}
    entries_at_crash = {pid: ledger.entries for pid, ledger in ledgers_before.items()}
    resumed = Federation(cfg, tmp_path / "cut", progress=False, resume=True)
    for pid, pp in resumed.privacy.participants.items():
        assert pp.ledger.epsilon("record") == pytest.approx(spent_at_crash[pid])
        assert pp.ledger.entries[:len(entries_at_crash[pid])] == entries_at_crash[pid]  # the chain is extended, never cut
    resumed.run()
    full, cut_summary = _summary(tmp_path / "full"), _summary(tmp_path / "cut")
    by_id = {p["id"]: p for p in full["participants"]}
    for p in cut_summary["participants"]:
        assert p["epsilon"] >= by_id[p["id"]]["epsilon"] - 1e-9  # never an under-count
        assert p["epsilon"] <= p["target_epsilon"] + 1e-9  # never over budget
    # The non-private schedule is seeded: the same rounds, with the same participants sampled.
    cut_rows, full_rows = metrics_without_time(tmp_path / "cut"), metrics_without_time(tmp_path / "full")
    assert [(r["round"], r["sampled"]) for r in cut_rows] == [(r["round"], r["sampled"]) for r in full_rows]
    assert main(["audit", str(tmp_path / "cut")]) == 0


def test_the_stricter_of_owner_policy_and_experiment_binds(tmp_path: Path) -> None:
    policy = tmp_path / "p1_policy.yaml"
    policy.write_text("max_epsilon: 2.0\ndelta: 1.0e-6\nunit: record\nparticipant: p1\n")
    raw = {**RECORD, "participants": [{**RECORD["participants"][0]},
                                      {"id": "p1", "model": "mlp_s", "target_epsilon": 8.0, "policy_file": str(policy)},
                                      {**RECORD["participants"][2]}]}
    summary = Federation(tiny_config(**raw, run={"rounds": 1}), tmp_path / "run", progress=False).run()
    p1 = next(p for p in summary["participants"] if p["id"] == "p1")
    assert p1["target_epsilon"] == 2.0 and p1["delta"] == 1e-6
    assert "policy" in p1["budget_note"] and p1["epsilon"] <= 2.0


def test_participant_level_noise_is_added_to_the_logits_and_booked(tmp_path: Path) -> None:
    cfg = tiny_config(privacy={"unit": "participant", "target_epsilon": 8.0, "clip_norm": 5.0}, run={"rounds": 2})
    fed = Federation(cfg, tmp_path / "run", progress=False)
    sent = {}
    real_outbound = fed.privacy.layer.outbound

    def spy(msg, party):  # type: ignore[no-untyped-def]
        out = real_outbound(msg, party)
        sent[party.id] = (msg.tensor("logits"), out.tensor("logits"))
        return out

    fed.privacy.layer.outbound = spy
    summary = fed.run()
    for before, after in sent.values():
        assert not torch.allclose(before, after)
    for p in summary["participants"]:
        assert p["unit"] == "participant" and 0 < p["epsilon"] <= 8.0
    entries = [json.loads(x) for x in (tmp_path / "run" / "ledgers" / "p0.jsonl").read_text().splitlines()]
    releases = [e for e in entries if e["kind"] == "release"]
    assert len(releases) == 2 and all(e["relation"] == "replace_one" for e in releases)
    assert releases[0]["sensitivity"] == pytest.approx(10.0)  # 2C under replace-one


def test_distributed_noise_requires_secure_aggregation_and_runs_under_masking(tmp_path: Path) -> None:
    from securefl.config import ConfigError

    with pytest.raises(ConfigError, match="distributed"):
        tiny_config(privacy={"unit": "participant", "target_epsilon": 8.0, "noise": "distributed"})
    cfg = tiny_config(privacy={"unit": "participant", "target_epsilon": 8.0, "noise": "distributed"},
                      secure_aggregation="masking", run={"rounds": 1})
    summary = Federation(cfg, tmp_path / "run", progress=False).run()
    assert all(p["epsilon"] <= 8.0 for p in summary["participants"])


def test_each_participant_keeps_one_ledger_object_for_the_whole_run(tmp_path: Path) -> None:
    fed = Federation(tiny_config(**RECORD), tmp_path / "run", progress=False)
    ledgers = {pid: pp.ledger for pid, pp in fed.privacy.participants.items()}
    replaced: list[tuple[int, str]] = []

    def check(rnd: int) -> None:
        replaced.extend((rnd, pid) for pid, pp in fed.privacy.participants.items() if pp.ledger is not ledgers[pid])

    fed.on_round_end = check
    fed.run()
    assert replaced == []
    # ...and the one ledger saw every round's spend.
    rounds = {e["round"] for e in ledgers["p0"].entries if e["kind"] == "release"}
    assert {0, 1, 2} <= rounds


def test_fedh2l_runs_every_alignment_variant_under_record_level_dp_within_budget(tmp_path: Path) -> None:
    """PCGrad post-processes the noised gradient; meta clips each record's two gradients (at θ and θ') as one
    vector, so neither adds a release: one DP-SGD event per local fit, as for plain distillation."""
    targets = [{"id": f"p{i}", "model": "mlp_s", "target_epsilon": 8.0} for i in range(3)]
    events = {}
    for name in ("none", "pcgrad", "meta"):
        fed = Federation(tiny_config(protocol="fedh2l", privacy={"unit": "record"}, participants=targets,
                                     run={"rounds": 2}, fedh2l={"alignment": name}), tmp_path / name, progress=False)
        summary = fed.run()
        assert all(p["epsilon"] <= 8.0 for p in summary["participants"]), (name, summary["participants"])
        events[name] = [(e["payload"], e["noise_multiplier"], e["sample_rate"], e["steps"])
                        for e in fed.privacy.participants["p0"].ledger.entries if e["kind"] == "release"]
    assert events["none"] and events["meta"] == events["none"] == events["pcgrad"], events


def test_pooled_baseline_is_refused_under_record_level_dp(tmp_path: Path) -> None:
    from securefl.protocols import ProtocolSetupError

    with pytest.raises(ProtocolSetupError, match="nothing for per-participant DP-SGD"):
        Federation(tiny_config(protocol="pooled", **RECORD), tmp_path / "run", progress=False)
    # The refused run leaves nothing behind (it had made config.yaml, run.json, a key and a header-only ledger) ...
    assert not (tmp_path / "run").exists()
    # ... but a directory that existed before it is not this run's to remove.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the owner's")
    with pytest.raises(ProtocolSetupError):
        Federation(tiny_config(protocol="pooled", **RECORD), tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the owner's"


def test_a_run_directory_whose_ledger_books_a_spend_is_never_discarded(tmp_path: Path) -> None:
    unstarted = Federation(tiny_config(**RECORD), tmp_path / "unstarted", progress=False)
    unstarted._discard_unstarted_run_dir()  # header-only ledgers: nothing to keep
    assert not (tmp_path / "unstarted").exists()
    spent = Federation(tiny_config(**RECORD, run={"rounds": 1}), tmp_path / "spent", progress=False)
    spent.run()
    spent._discard_unstarted_run_dir()
    assert len(list((tmp_path / "spent" / "ledgers").glob("*.jsonl"))) == 3


def test_fedgen_label_histograms_are_released_once_with_the_gaussian_mechanism_at_sensitivity_one(tmp_path: Path) -> None:
    """Record level: each user's label counts leave once, noised (σ = privacy.histogram_noise_multiplier,
    sensitivity 1, add/remove), booked in its ledger and planned into its budget; the uplinked histogram is
    that release, not the raw counts."""

    from securefl.privacy.audit import audit_run
    from tests.protocols.contract import RecordingTransport

    targets = [{"id": f"p{i}", "model": "mlp_s", "target_epsilon": 8.0} for i in range(3)]
    transport = RecordingTransport()
    fed = Federation(tiny_config(protocol="fedgen", privacy={"unit": "record", "histogram_noise_multiplier": 5.0},
                                 participants=targets, run={"rounds": 2}, fedgen={"mode": "private"}),
                     tmp_path / "run", progress=False, transport=transport)
    summary = fed.run()
    for party in fed.parties:
        entries = [json.loads(line) for line in (tmp_path / "run" / "ledgers" / f"{party.id}.jsonl").read_text().splitlines()]
        histograms = [e for e in entries if e.get("payload") == "label_histogram"]
        assert len(histograms) == 1  # two rounds, one release
        assert histograms[0]["mechanism"] == "gaussian" and histograms[0]["sensitivity"] == 1.0
        assert histograms[0]["noise_multiplier"] == 5.0 and histograms[0]["relation"] == "add_remove"
        sent = [m.tensor("label_counts") for m in transport.sent if m.sender == party.id and "label_counts" in m.payload]
        raw = party.train.label_counts(fed.ctx.num_classes).float()
        assert len(sent) == 2 and torch.equal(sent[0], sent[1])  # the same release both rounds
        assert not torch.equal(sent[0], raw) and (sent[0] - raw).abs().max() < 5.0 * 6  # noised, at σ = 5
    assert all(p["epsilon"] <= 8.0 for p in summary["participants"])
    assert audit_run(tmp_path / "run").ok
