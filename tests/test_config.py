"""The experiment config (securefl/config.py): one-line errors that name the field and the value, YAML failures,
``--set`` overrides, merging, differences, and the one minimum cohort every layer uses.

What is tested elsewhere: that the command line prints one line naming the field for many bad configs
(test_cli.py); that any text, mapping or override parses or fails with a ConfigError (reliability/test_fuzz.py);
nested and list paths of ``config_differences`` (runtime/test_resume_config.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest

from securefl.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_differences,
    deep_merge,
    format_validation_error,
    load_config,
    load_raw,
    load_raw_text,
    parse_config,
    parse_config_text,
)
from securefl.privacy.cohort import min_cohort
from securefl.runtime.host import sampled_per_round
from tests.conftest import tiny_config, tiny_raw


def _error(raw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "exp.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


# ----- one line naming the field and the value -------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "message"), [
    (tiny_raw(run={"rounds": 0, "typo": 3}),
     "exp.yaml: run.rounds = 0: Input should be greater than or equal to 1; run.typo: unknown field (value 3)"),
    (tiny_raw(participants=[{"id": "a", "model": "mlp_s", "colour": "red"}]),
     "exp.yaml: participants.0.colour: unknown field (value 'red')"),
    # The partition's tag (dirichlet) is not in the YAML path, so it is not in the message either.
    (tiny_raw(data={"partition": {"kind": "dirichlet", "alpha": -1}}),
     "exp.yaml: data.partition.alpha = -1: Input should be greater than 0"),
    # A long value is cut to 60 characters.
    (tiny_raw(run={"rounds": "y" * 100}),
     f"exp.yaml: run.rounds = '{'y' * 56}...: Input should be a valid integer, unable to parse string as an integer"),
    ({"participants": [{"id": "a", "model": "mlp_s"}]}, "exp.yaml: protocol: required field is missing"),
    ([tiny_raw()], "exp.yaml: the top level must be a mapping of sections, got list"),
], ids=["two-errors", "extra-in-a-list", "union-tag", "long-value", "missing", "not-a-mapping"])
def test_a_config_error_is_one_line_naming_each_field_and_its_value(raw: Any, message: str) -> None:
    assert _error(raw) == message


@pytest.mark.parametrize(("changes", "ending"), [
    ({"participants": [{"id": "a", "model": "mlp_s"}, {"id": "b", "model": "mlp_s"}, {"id": "a", "model": "cnn_s"}]},
     "participant ids must be unique; repeated: a"),
    ({"participants": [{"id": "a", "model": "mlp_s", "target_epsilon": 1.0}]},
     "privacy.unit is 'none' but ε targets are set; choose privacy.unit: record or participant"),
    ({"privacy": {"unit": "record"}, "participants": [{"id": "a", "model": "mlp_s", "target_epsilon": 1.0},
                                                      {"id": "b", "model": "mlp_s"}]},
     "participants.1.target_epsilon: required when privacy.unit is 'record' (or set privacy.target_epsilon for "
     "everyone, or a policy_file)"),
    ({"protocol": "pooled", "participants": [{"id": "a", "model": "mlp_s"}, {"id": "b", "model": "mlp_s", "lr": 0.1}]},
     "participants.1.lr = 0.1: the pooled baseline trains one model per architecture on everyone's data, no owner's "
     "own model; remove it"),
    ({"participants": [{"id": "a", "model": "mlp_s", "data_file": "a.csv"}]},
     "participants.0.data_file: only used when data.dataset is 'files' (it is 'digits')"),
], ids=["duplicate-ids", "targets-without-dp", "missing-target", "pooled-own-lr", "data-file-unused"])
def test_a_rule_across_fields_names_the_field_it_concerns(changes: dict[str, Any], ending: str) -> None:
    message = _error(tiny_raw(**changes))
    assert message.startswith("exp.yaml: ") and message.endswith(ending), message


def test_format_validation_error_names_the_source_it_is_given() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ExperimentConfig.model_validate(tiny_raw(training={"batch_size": 0}))
    assert format_validation_error(info.value) == ("config: training.batch_size = 0: Input should be greater than or "
                                                   "equal to 1")
    assert format_validation_error(info.value, "node.yaml").startswith("node.yaml: training.batch_size = 0")


def test_every_section_is_frozen() -> None:
    cfg = tiny_config()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.run.rounds = 5
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.participants[0].model = "cnn_s"


# ----- YAML ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "message"), [
    ("protocol: fedmd\nrun: [1\n", "s.yaml: not valid YAML at line 3, column 1"),
    ("run: {seed: 1\n", "s.yaml: not valid YAML at line 2, column 1"),
    ("run:\n  name: 2024-13-01\n", "s.yaml: not valid YAML: month must be in 1..12"),
    ("run: !!float abc\n", "s.yaml: not valid YAML: could not convert string to float: 'abc'"),
    ("[" * 5000, "s.yaml: not valid YAML: nested too deeply"),
    ("", "s.yaml: the file is empty"),
    ("# only a comment\n", "s.yaml: the file is empty"),
], ids=["unclosed-list", "unclosed-mapping", "impossible-date", "bad-float-tag", "too-deep", "empty", "comment-only"])
def test_a_yaml_failure_is_one_line_saying_where(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_raw_text(text, "s.yaml")
    assert str(info.value) == message


def test_a_config_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^.*missing\.yaml: cannot read config \(No such file or directory\)$"):
        load_raw(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"protocol: fedmd\n\xff\xfe")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not a UTF-8 text file \(byte 16\)$"):
        load_raw(binary)
    with pytest.raises(ConfigError, match="^t.yaml: the top level must be a mapping of sections, got list$"):
        parse_config_text("- fedmd\n- fml\n", "t.yaml")


# ----- --set overrides -----------------------------------------------------------------------------------------------
def test_overrides_land_on_dotted_paths_making_sections_as_needed(tmp_path: Path) -> None:
    raw = tiny_raw()
    out = apply_overrides(raw, ["participants.1.model=cnn_s", "fedavg.weighting=uniform", "run.name=a=b",
                                "privacy.delta=2e-3", "run.eval_every=1e1", "signing=false", "run.seed=null",
                                "data.private_classes=[0, 1, 2]"])
    assert out is raw  # applied in place
    assert raw["participants"][1] == {"id": "p1", "model": "cnn_s"}
    assert raw["fedavg"] == {"weighting": "uniform"}  # a section the file did not have
    assert raw["run"]["name"] == "a=b"  # split at the first '='
    # YAML 1.1 reads 2e-3 as a string; an override means the number.
    assert raw["privacy"]["delta"] == 0.002 and raw["run"]["eval_every"] == 10.0
    assert raw["signing"] is False and raw["run"]["seed"] is None and raw["data"]["private_classes"] == [0, 1, 2]
    path = tmp_path / "exp.yaml"
    path.write_text("protocol: fedmd\nparticipants:\n  - {id: a, model: mlp_s}\n")
    assert load_config(path, ["participants.0.model=cnn_s", "run.rounds=4"]).run.rounds == 4


@pytest.mark.parametrize(("override", "message"), [
    ("run.rounds", "--set 'run.rounds': expected key.path=value"),
    ("run.name=[a", "--set 'run.name=[a': the value is not valid YAML"),
    ("participants.3.model=mlp_s", "--set participants.3.model: '3' is not an index of a list of 3"),
    ("participants.first.model=mlp_s", "--set participants.first.model: 'first' is not an index of a list of 3"),
    ("run.seed.x=1", "--set run.seed.x: run.seed is not a section"),
], ids=["no-equals", "bad-yaml", "index-out-of-range", "not-an-index", "through-a-value"])
def test_a_bad_override_is_one_line_naming_it(override: str, message: str) -> None:
    raw = tiny_raw()
    with pytest.raises(ConfigError) as info:
        apply_overrides(raw, [override])
    assert str(info.value) == message


# ----- merging and differences -------------------------------------------------------------------------------------
def test_deep_merge_merges_sections_replaces_everything_else_and_shares_nothing() -> None:
    base = {"run": {"seed": 1, "rounds": 2}, "participants": [{"id": "a"}], "protocol": "fedmd"}
    changes = {"run": {"rounds": 5}, "participants": [{"id": "b"}], "fml": {"alpha": 0.3}}
    merged = deep_merge(base, changes)
    assert merged == {"run": {"seed": 1, "rounds": 5}, "participants": [{"id": "b"}], "protocol": "fedmd",
                      "fml": {"alpha": 0.3}}
    assert base == {"run": {"seed": 1, "rounds": 2}, "participants": [{"id": "a"}], "protocol": "fedmd"}
    merged["participants"][0]["id"] = "c"
    merged["fml"]["alpha"] = 0.9
    assert changes == {"run": {"rounds": 5}, "participants": [{"id": "b"}], "fml": {"alpha": 0.3}}
    # A section replaced by a value (or a value by a section) is replaced, not merged.
    assert deep_merge({"a": {"b": 1}}, {"a": 3}) == {"a": 3}
    assert deep_merge({"a": 3}, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_config_differences_at_the_root_and_where_a_section_became_a_value() -> None:
    assert config_differences(1, 2) == ["(the whole config)"]
    assert config_differences({"a": {"b": 1}}, {"a": 1}) == ["a"]


# ----- the minimum cohort -------------------------------------------------------------------------------------------
def _cohort_config(secure: str, *, threshold: float = 0.67, minimum: float = 0.67, noise: str | None = None,
                   n: int = 10, participation: float = 1.0) -> Any:
    changes: dict[str, Any] = {
        "secure_aggregation": secure, "masking": {"threshold_fraction": threshold},
        "privacy": {"min_contributors": minimum},
        "participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(n)], "run": {"participation": participation}}
    if noise is not None:
        changes["privacy"] |= {"unit": "participant", "target_epsilon": 4.0, "noise": noise}
    return tiny_config(**changes)


@pytest.mark.parametrize(("config", "fraction"), [
    (lambda: _cohort_config("none", minimum=0.8), 0.8),
    (lambda: _cohort_config("ckks", threshold=0.9, minimum=0.8), 0.8),  # masking's threshold is not CKKS's
    (lambda: _cohort_config("masking", threshold=0.6, minimum=0.8), 0.6),
    (lambda: _cohort_config("masking", threshold=0.6, minimum=0.8, noise="local"), 0.6),
    # Distributed noise under masking: one t for both, the larger.
    (lambda: _cohort_config("masking", threshold=0.6, minimum=0.8, noise="distributed"), 0.8),
    (lambda: _cohort_config("masking", threshold=0.9, minimum=0.7, noise="distributed"), 0.9),
], ids=["plain", "ckks", "masking", "masking-local-noise", "distributed-min-contributors", "distributed-threshold"])
def test_the_cohort_fraction_is_the_one_in_force(config: Any, fraction: float) -> None:
    cfg = config()
    assert cfg.cohort_fraction() == fraction
    assert cfg.cohort().minimum == min_cohort(cfg.cohort().per_round, fraction=fraction)


def test_the_cohort_is_what_the_round_loop_samples_and_its_minimum_a_strict_majority() -> None:
    for n, participation in [(10, 1.0), (10, 0.3), (5, 0.5), (7, 0.5), (3, 0.67), (120, 0.1)]:
        cfg = _cohort_config("masking", n=n, participation=participation)
        cohort = cfg.cohort()
        # The layers book and enforce n from the config; the round loop samples by its own rule: they must agree.
        assert cohort.per_round == sampled_per_round(cfg, n), (n, participation)
        assert cohort.per_round // 2 < cohort.minimum <= cohort.per_round
        assert cohort.participants == tuple(f"p{i}" for i in range(n))
    # t = ceil(f·n), never lowered by floating point: 0.7 · 10 is 7.000000000000001.
    assert _cohort_config("ckks", minimum=0.7).cohort().minimum == 7
    assert _cohort_config("ckks", minimum=0.67, n=5).cohort().minimum == 4  # ceil(3.35), not round(3.35) = 3
