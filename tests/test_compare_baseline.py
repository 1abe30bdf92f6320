"""``securefl compare``: the "vs" column is against local_only wherever it is listed, else the last protocol."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from securefl import cli
from securefl.cli import comparison_table


def _row(protocol: str, mean: float) -> dict[str, Any]:
    return {"protocol": protocol, "mean_accuracy": mean, "min_accuracy": mean - 0.1, "max_accuracy": mean + 0.1}


def test_local_only_is_the_baseline_in_any_position() -> None:
    for order in (["local_only", "fedmd", "pooled"], ["fedmd", "local_only", "pooled"]):
        rows = [_row(name, {"local_only": 0.5, "fedmd": 0.7, "pooled": 0.9}[name]) for name in order]
        lines = comparison_table(rows)
        assert lines[0] == f"{'protocol':<12} {'mean acc':>9} {'min':>7} {'max':>7}  vs local_only"
        deltas = {line.split()[0]: line.split("  ")[-1] for line in lines[1:]}
        assert deltas == {"local_only": "+0.0 pts", "fedmd": "+20.0 pts", "pooled": "+40.0 pts"}


def test_without_local_only_the_last_listed_is_the_baseline_and_the_header_says_so() -> None:
    lines = comparison_table([_row("fedmd", 0.7), _row("fedh2l", 0.8), _row("fedavg", 0.6)])
    assert lines[0].endswith("  vs fedavg (last listed; no local_only)")
    assert [line.split("  ")[-1] for line in lines[1:]] == ["+10.0 pts", "+20.0 pts", "+0.0 pts"]


def test_one_protocol_has_no_vs_column() -> None:
    lines = comparison_table([_row("fedmd", 0.7)])
    assert lines == [f"{'protocol':<12} {'mean acc':>9} {'min':>7} {'max':>7}",
                     f"{'fedmd':<12} {0.7:>9.4f} {0.6:>7.4f} {0.8:>7.4f}"]


def test_cmd_compare_prints_the_table_against_local_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The command itself, with each run replaced by a fixed summary (the runs are covered elsewhere)."""
    means = {"local_only": 0.6658, "fedmd": 0.7084, "pooled": 0.9}

    class FakeFederation:
        def __init__(self, config: Any, out: Path, **kwargs: Any) -> None:
            self.name = config.protocol

        def run(self) -> dict[str, Any]:
            return _row(self.name, means[self.name])

    monkeypatch.setattr("securefl.runtime.federation.Federation", FakeFederation)
    monkeypatch.setattr(cli, "_load", lambda path, overrides, data_dir: argparse.Namespace(
        protocol=overrides[-1].removeprefix("protocol=")))
    args = argparse.Namespace(config="unused.yaml", protocols=["fedmd", "local_only", "pooled"], out=str(tmp_path),
                              overrides=[], data_dir=None, quiet=True, threads=None, keys=None)
    assert cli.cmd_compare(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].endswith("vs local_only")
    assert out[2:] == ["fedmd           0.7084  0.6084  0.8084  +4.3 pts",
                       "local_only      0.6658  0.5658  0.7658  +0.0 pts",
                       "pooled          0.9000  0.8000  1.0000  +23.4 pts"]
    assert [r["protocol"] for r in json.loads((tmp_path / "comparison.json").read_text())] == list(args.protocols)
