"""benchmarks/scale.py in --quick mode: two small federations, each in its own process, and the files they leave."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_scale_run_writes_one_row_per_k_with_positive_times_and_memory(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((tmp_path / "scale_quick.json").read_text())
    assert result["protocol"] == "fedavg" and result["participation"] == 0.1 and result["rounds"] == 1
    rows = result["rows"]
    assert [row["participants"] for row in rows] == [10, 30]
    assert [row["sampled_per_round"] for row in rows] == [1, 3]
    for row in rows:
        for name in ("setup_s", "setup_cpu_s", "first_round_s", "round_s", "round_cpu_s", "exchange_s",
                     "evaluate_checkpoint_s", "baseline_rss_mb", "setup_rss_mb", "peak_rss_mb"):
            assert row[name] > 0, (name, row)
        assert row["baseline_rss_mb"] <= row["setup_rss_mb"] <= row["peak_rss_mb"]
        assert 1 <= row["records_per_owner"][0] <= row["records_per_owner"][1]
        assert len(row["metrics_sha256"]) == 64
        assert all(value > 0 for value in row["ratios"].values())
    assert rows[0]["ratios"]["participants"] == 1.0 and rows[1]["ratios"]["participants"] == 3.0
    assert rows[0]["per_added_participant"] is None
    assert set(rows[1]["per_added_participant"]) == set(rows[1]["ratios"]) - {"participants"}

    table = (tmp_path / "scale_quick.md").read_text()
    assert "Made by `python benchmarks/scale.py --quick`" in table
    assert "| 10 | 1 |" in table and "| 30 | 3 |" in table
