"""--resume takes the config the run started with, including one written before fields were added."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from securefl.config import config_differences
from securefl.runtime.checkpoint import RunDirError
from securefl.runtime.federation import Federation
from tests.conftest import Crash, crash_after_round, metrics_without_time, tiny_config


def crashed_run(tmp_path: Path, name: str = "cut") -> tuple[object, Path]:
    cfg = tiny_config(protocol="fedmd", run={"rounds": 3})
    with pytest.raises(Crash):
        Federation(cfg, tmp_path / name, progress=False, on_round_end=crash_after_round(1)).run()
    return cfg, tmp_path / name


def test_a_run_written_before_a_field_existed_resumes_to_the_uninterrupted_metrics(tmp_path: Path) -> None:
    cfg, cut = crashed_run(tmp_path)
    saved = yaml.safe_load((cut / "config.yaml").read_text())
    # As an earlier version wrote it: without fields added since (here, two that are at their defaults).
    del saved["fedgen"]["generator_output"], saved["privacy"]["min_contributors"]
    (cut / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    Federation(cfg, cut, progress=False, resume=True).run()
    Federation(cfg, tmp_path / "full", progress=False).run()
    assert metrics_without_time(cut) == metrics_without_time(tmp_path / "full")
    assert "generator_output" in (cut / "config.yaml").read_text()  # the record is complete again


def test_resuming_under_another_config_is_refused_naming_where_it_differs(tmp_path: Path) -> None:
    _, cut = crashed_run(tmp_path)
    other = tiny_config(protocol="fedmd", run={"rounds": 3}, fedmd={"digest_epochs": 2},
                        training={"lr": 0.5})
    with pytest.raises(RunDirError, match=r"differ at fedmd\.digest_epochs, training\.lr$"):
        Federation(other, cut, progress=False, resume=True)


def test_a_saved_config_this_version_cannot_read_is_refused_with_the_reason(tmp_path: Path) -> None:
    cfg, cut = crashed_run(tmp_path)
    saved = yaml.safe_load((cut / "config.yaml").read_text())
    saved["fedmd"]["retired_option"] = 3  # a field an earlier version had and this one does not
    (cut / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(RunDirError, match="no longer parses.*retired_option"):
        Federation(cfg, cut, progress=False, resume=True)


def test_config_differences_names_nested_and_list_paths() -> None:
    old = {"a": {"b": 1, "c": [1, 2]}, "p": [{"id": "x", "model": "m"}], "gone": 1}
    new = {"a": {"b": 2, "c": [1, 2]}, "p": [{"id": "x", "model": "n"}], "added": 1}
    assert config_differences(old, new) == ["a.b", "added", "gone", "p.0.model"]
    assert config_differences({"l": [1]}, {"l": [1, 2]}) == ["l"]
    assert config_differences(old, old) == []
