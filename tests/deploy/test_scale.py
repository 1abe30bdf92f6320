"""Scale-out on one machine: 120 participants through securefl's own runtime."""

from __future__ import annotations

import json
from pathlib import Path

from securefl.config import parse_config
from securefl.runtime.federation import Federation
from tests.conftest import tiny_raw


def test_one_hundred_and_twenty_participants_with_ten_percent_sampled(tmp_path: Path) -> None:
    raw = tiny_raw(protocol="fedmd", run={"rounds": 3, "participation": 0.1},
                   data={"public_size": 200, "val_fraction": 0.0}, fedmd={"alignment_size": 200, "transfer_max_epochs": 1})
    raw["data"]["partition"] = {"kind": "iid"}
    raw["participants"] = [{"id": f"site{i:03d}", "model": ["mlp_s", "cnn_s"][i % 2]} for i in range(120)]
    summary = Federation(parse_config(raw), tmp_path / "run", progress=False).run()
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sampled = [set(r["sampled"]) for r in rounds[1:]]
    assert [len(s) for s in sampled] == [12, 12, 12]
    assert len(set.union(*sampled)) > 12  # a different sample each round
    assert len(summary["participants"]) == 120 and all(r["rejected"] == [] for r in rounds)
    # Only the sampled participants sent logits: 12 messages of 200 x 10 float32 per round.
    assert all(r["communication_bytes"].get("logits") == 12 * 200 * 10 * 4 for r in rounds[1:])
