"""The accuracy benchmark's --set option: a schedule change is checked up front and kept apart from the main table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file is executed
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_set_values_are_read_as_yaml_and_land_on_the_dotted_path(accuracy):
    sets = ("fedgen.local_steps=170", "training.lr=2e-3", "heterofl.hidden_sizes=[8, 16]")
    original = {"training": {"lr": 1e-3, "batch_size": 64}}
    raw = accuracy.with_sets(original, tuple(accuracy.check_set(item) for item in sets))
    assert original == {"training": {"lr": 1e-3, "batch_size": 64}}  # the base config is not changed in place
    assert raw["fedgen"] == {"local_steps": 170}
    assert raw["training"] == {"lr": 2e-3, "batch_size": 64}  # the sibling field survives
    assert raw["heterofl"]["hidden_sizes"] == [8, 16]


@pytest.mark.parametrize("text", ["local_steps=3", "fedgen.local_steps", "Fedgen.x=1", "=3"])
def test_a_malformed_set_is_refused(accuracy, text):
    with pytest.raises(ValueError, match="section.field=value"):
        accuracy.check_set(text)


def test_a_changed_schedule_gets_its_own_run_directory(accuracy):
    row = accuracy.ROWS[0]
    plain = accuracy.run_dir("A1", row, "inf", 1, False)
    changed = accuracy.run_dir("A1", row, "inf", 1, False, None, ("fedgen.local_steps=170",))
    longer = accuracy.run_dir("A1", row, "inf", 1, False, 25, ("fedgen.local_steps=170",))
    assert len({plain, changed, longer}) == 3 and plain.parent == changed.parent
    assert changed.name == "seed1-fedgen.local_steps=170" and longer.name == "seed1-r25-fedgen.local_steps=170"


@pytest.mark.parametrize("argv, message", [
    (["--set", "fedgen.local_steps=3"], "its own --out-name"),
    (["--set", "fedgen.local_stepz=3", "--out-name", "x"], "local_stepz"),
    (["--set", "fedgen.local_steps=-3", "--out-name", "x"], "local_steps"),
])
def test_main_refuses_a_bad_set_before_any_run(accuracy, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
