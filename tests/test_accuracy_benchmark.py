"""The accuracy benchmark's plumbing: --set, run directories, the merged results file and its plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from securefl.config import parse_config
from securefl.data.datasets import FASHION_MNIST_DEFAULT_DIR

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


@pytest.mark.parametrize("argv, message", [
    (["--fedavg-model", "mlp_s"], "its own --out-name"),
    (["--fedavg-model", "mlp_xl", "--out-name", "x"], "mlp_xl"),
])
def test_main_refuses_a_bad_fedavg_model_before_any_run(accuracy, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_fedavg_with_another_model_is_a_row_of_its_own_where_every_owner_gets_that_model(accuracy):
    fedavg = next(row for row in accuracy.ROWS if row.protocol == "fedavg")
    mlp = accuracy.with_homogeneous_model(fedavg, "mlp_s")
    assert mlp.variant == "homogeneous mlp_s" and accuracy.find_row("fedavg", "homogeneous mlp_s") == mlp
    assert accuracy.run_dir("A1", mlp, "8", 0, False).parts[-3] == "fedavg-homogeneous_mlp_s"
    assert accuracy.run_dir("A1", fedavg, "8", 0, False).parts[-3] == "fedavg-homogeneous_cnn_s"
    for eps, rate in (("8", None), ("2", 0.01)):  # mlp_s's validated DP rate at ε = 2 is 0.01, the row's is 0.05
        cell = accuracy.cell_config("A1", mlp, eps, 0, quick=False, data_dir=None, rounds=None, sets=())
        assert {p["model"] for p in cell["participants"]} == {"mlp_s"}
        assert {p.get("lr") for p in cell["participants"]} == {rate}
        parse_config(cell)
    rows = accuracy.rows_with_fedavg_model("deepcnn_s")
    assert [row.variant for row in rows if row.protocol == "fedavg"] == ["homogeneous deepcnn_s"]  # run once
    assert len(rows) == len(accuracy.ROWS) - 1


def fake_run(run: Path, accuracies: list[list[float]], meme: list[list[float]] | None = None) -> Path:
    """A run directory whose metrics.jsonl holds one line per round, one accuracy per participant."""
    run.mkdir(parents=True)
    lines = []
    for rnd, values in enumerate(accuracies):
        participants = {f"p{i}": {"accuracy": v, **({"meme_accuracy": meme[rnd][i]} if meme else {})}
                        for i, v in enumerate(values)}
        lines.append(json.dumps({"round": rnd, "mean_accuracy": sum(values) / len(values),
                                 "participants": participants}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_curves_are_the_mean_over_participants_round_by_round(accuracy, tmp_path):
    run = fake_run(tmp_path / "r", [[0.1, 0.3], [0.5, 0.7]], meme=[[0.2, 0.2], [0.6, 0.6]])
    curves = accuracy.read_curves(run)
    assert curves["accuracy"] == pytest.approx([0.2, 0.6]) and curves["meme_accuracy"] == pytest.approx([0.2, 0.6])
    assert accuracy.read_curves(tmp_path / "gone") == {}


def test_a_run_evaluated_every_few_rounds_has_gaps_in_its_curve_and_still_plots(accuracy, tmp_path):
    run = fake_run(tmp_path / "r", [[0.1, 0.3], [0.5, 0.7], [0.6, 0.8]])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rounds = [0, 2, 4]  # eval_every = 2: rounds 1 and 3 have no line
    (run / "metrics.jsonl").write_text("\n".join(
        json.dumps({**json.loads(line), "round": r}) for line, r in zip(lines, rounds, strict=True)) + "\n")
    curve = accuracy.read_curves(run)["accuracy"]
    assert curve[1] is None and curve[3] is None
    assert [curve[r] for r in rounds] == pytest.approx([0.2, 0.6, 0.7])
    rows = [{"setting": "A1", "protocol": "heterofl", "variant": "a-e mix", "epsilon": "inf",
             "per_seed": [{"curve": curve}]}]
    accuracy.plot_rounds(rows, tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").stat().st_size > 0


def summary(mean: float) -> dict:
    return {"mean_accuracy": mean, "min_accuracy": mean - 0.1, "max_accuracy": mean + 0.1, "rounds": 1,
            "participants": [{"accuracy": mean}]}


def test_the_plot_is_drawn_from_every_merged_cell_not_only_this_invocations(accuracy, tmp_path, monkeypatch):
    """A later invocation of one row must not leave a plot of that row alone (it once did)."""
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    drawn: list[dict] = []
    monkeypatch.setattr(accuracy, "plot_rounds", lambda rows, path, title: drawn.extend(rows))
    local, fedgen = accuracy.ROWS[0], next(r for r in accuracy.ROWS if r.protocol == "fedgen")
    first = {"task": ("A1", local, "inf", 0), "summary": summary(0.5),
             "run_dir": fake_run(tmp_path / "a", [[0.1], [0.5]])}
    accuracy.write_results([first], "t", "first command")
    second = {"task": ("A1", fedgen, "inf", 0), "summary": summary(0.6),
              "run_dir": fake_run(tmp_path / "b", [[0.2], [0.6]])}
    drawn.clear()
    accuracy.write_results([second], "t", "second command")
    assert {(r["protocol"], tuple(r["per_seed"][0]["curve"])) for r in drawn} == {
        ("local_only", (0.1, 0.5)), ("fedgen", (0.2, 0.6))}


def test_the_table_gives_the_spread_across_seeds(accuracy, tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(accuracy, "plot_rounds", lambda rows, path, title: None)
    local, fedgen = accuracy.ROWS[0], next(r for r in accuracy.ROWS if r.protocol == "fedgen")
    accuracy.write_results([{"task": ("A1", local, "8", seed), "summary": summary(mean)}
                            for seed, mean in ((0, 0.5), (1, 0.7), (2, 0.6))]
                           + [{"task": ("A1", fedgen, "8", 0), "summary": summary(0.4)}], "t", "cmd")
    row = next(r for r in json.loads((tmp_path / "t.json").read_text()) if r["protocol"] == "local_only")
    assert row["std"] == pytest.approx(0.1)  # sample std of 0.5, 0.7, 0.6
    table = (tmp_path / "t.md").read_text()
    assert "| local_only | - | 60.0 ± 10.0 (50-70), 3 seeds |" in table
    assert "| fedgen | private | 40.0 (30-50), 1 seed |" in table


def test_replot_adds_curves_from_run_directories_and_keeps_the_command(accuracy, tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    local = accuracy.ROWS[0]
    accuracy.write_results([{"task": ("A1", local, "inf", 3), "summary": summary(0.5)}], "t", "the command")
    assert "curve" not in json.loads((tmp_path / "t.json").read_text())[0]["per_seed"][0]
    fake_run(accuracy.run_dir("A1", local, "inf", 3, False), [[0.3], [0.5]])
    assert accuracy.main(["--replot", "--out-name", "t"]) == 0
    assert json.loads((tmp_path / "t.json").read_text())[0]["per_seed"][0]["curve"] == [0.3, 0.5]
    assert "Last made by `the command`" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "t_rounds.png").stat().st_size > 10_000


def test_dp_columns_get_the_rows_dp_settings_and_the_private_column_does_not(accuracy):
    fedgen = next(row for row in accuracy.ROWS if (row.protocol, row.variant) == ("fedgen", "private"))
    cell = {eps: accuracy.cell_config("A1", fedgen, eps, 0, quick=False, data_dir=None, rounds=None, sets=())
            for eps in ("inf", "8", "mixed")}
    assert cell["inf"]["fedgen"]["lr"] == 1e-3 and cell["inf"]["fedgen"]["optimizer"] == "adam"
    assert "privacy" not in cell["inf"]
    for eps in ("8", "mixed"):
        assert cell[eps]["fedgen"]["lr"] == accuracy.DP_PLAIN_SGD_LR and cell[eps]["fedgen"]["optimizer"] == "sgd"
        assert cell[eps]["fedgen"]["local_epochs"] == 1  # the row's settings survive
        assert cell[eps]["privacy"] == {"unit": "record", "delta": 1e-5}
    assert [p["target_epsilon"] for p in cell["mixed"]["participants"]][:4] == [1.0, 4.0, 8.0, 1.0]


def test_the_adam_rows_train_with_momentum_sgd_in_the_dp_columns_only(accuracy):
    for row in accuracy.ROWS:
        if "training" not in row.dp_overrides:
            continue
        private, dp = (accuracy.cell_config("A1", row, eps, 0, quick=False, data_dir=None, rounds=None, sets=())
                       for eps in ("inf", "2"))
        assert (private["training"]["optimizer"], private["training"]["lr"]) == ("adam", 1e-3), row
        assert (dp["training"]["optimizer"], dp["training"]["lr"]) == ("sgd", accuracy.DP_MOMENTUM_SGD_LR), row
        assert dp["training"]["batch_size"] == private["training"]["batch_size"]  # the rest of the section survives
    rows = {(row.protocol, row.variant) for row in accuracy.ROWS if "training" in row.dp_overrides}
    assert {("local_only", "-"), ("fedavg", "homogeneous cnn_s"), ("fedmd", "-"), ("fedh2l", "plain")} <= rows


def test_the_dp_rate_table_is_what_the_validation_grid_chose(accuracy):
    spec = importlib.util.spec_from_file_location("dp_lr_benchmark", ROOT / "benchmarks" / "dp_lr.py")
    dp_lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dp_lr)
    grid = json.loads((accuracy.RESULTS / "dp_lr_grid.json").read_text())["rows"]
    chosen = {case: row["lr"] for case, row in dp_lr.best_settings(grid).items()}
    assert accuracy.DP_RATES == chosen
    assert {row["momentum"] for row in grid} == {0.9}  # the rows' DP optimizer: momentum SGD
    assert {model for model, _ in chosen} == set(accuracy.A1_MODELS)
    assert {eps for _, eps in chosen} >= {1.0, 2.0, 8.0, *accuracy.MIXED_TARGETS}


def test_a_participant_carries_its_own_dp_rate_only_where_validation_chose_another(accuracy, monkeypatch):
    monkeypatch.setattr(accuracy, "DP_RATES", {("mlp_l", 1.0): 0.01, ("cnn_s", 1.0): accuracy.DP_MOMENTUM_SGD_LR})
    by_name = {(row.protocol, row.variant): row for row in accuracy.ROWS}
    mixed = accuracy.cell_config("A1", by_name["fedmd", "-"], "mixed", 0, quick=False, data_dir=None, rounds=None,
                                 sets=())
    # p3 is the wide MLP with target 1 (targets cycle 1, 4, 8); p0's cnn_s at ε = 1 keeps the row's rate.
    assert [p.get("lr") for p in mixed["participants"]] == [None, None, None, 0.01] + [None] * 6
    for row, eps in ((by_name["fedmd", "-"], "inf"), (by_name["fml", "local"], "mixed")):
        cell = accuracy.cell_config("A1", row, eps, 0, quick=False, data_dir=None, rounds=None, sets=())
        assert all("lr" not in p for p in cell["participants"]), row  # no DP, or a row with its own lr section
    parse_config(mixed)  # the config schema takes the owner's rate


def test_a2_trains_fedmd_transfer_and_the_local_baseline_to_convergence(accuracy):
    a1, a2 = (accuracy.base_config(setting, 0, quick=False, data_dir=None) for setting in ("A1", "A2"))
    assert (a2["fedmd"]["transfer_max_epochs"], a2["fedmd"]["transfer_patience"]) == (50, 5)
    assert (a2["local_only"]["max_epochs_first"], a2["local_only"]["patience"]) == (50, 5)
    assert (a1["fedmd"]["transfer_max_epochs"], a1["local_only"]["max_epochs_first"]) == (10, 10)


def test_a_finished_cell_made_under_another_config_is_not_reused(accuracy, tmp_path):
    from securefl.config import dump_config, parse_config

    fedgen = next(row for row in accuracy.ROWS if (row.protocol, row.variant) == ("fedgen", "private"))
    raw = accuracy.cell_config("A1", fedgen, "8", 0, quick=True, data_dir=None, rounds=None, sets=())
    config = parse_config(raw, "cell")
    old_raw = {**raw, "fedgen": {**raw["fedgen"], "lr": 0.01}}  # the row's DP lr before it was raised
    (tmp_path / "config.yaml").write_text(dump_config(parse_config(old_raw, "old cell")))
    (tmp_path / "summary.json").write_text(json.dumps({"mean_accuracy": 0.29}))
    task = ("A1", fedgen, "8", 0)
    stale = accuracy.reuse_finished(task, tmp_path, config)
    assert "summary" not in stale and "fedgen.lr" in stale["failed"]
    (tmp_path / "config.yaml").write_text(dump_config(config))
    assert accuracy.reuse_finished(task, tmp_path, config)["summary"] == {"mean_accuracy": 0.29}


def test_every_dp_cell_passes_the_privacy_set_up_and_releases_no_count(accuracy):
    """Issue 19, findings 4-7: a DP cell must not weight by exact record counts or send the classes present,
    or its run is refused before round 1 (FedAvg averages uniformly, FedGen's reference heads unweighted, HeteroFL
    takes every class), while the non-private column keeps each paper's own setting."""
    from types import SimpleNamespace

    from securefl.layers.privacy import unsafe_release_reasons
    from securefl.protocols import get_protocol

    # What the protocols read of the data at construction (Fashion-MNIST's shapes), without loading it.
    ctx = SimpleNamespace(input_shape=(1, 28, 28), num_classes=10, seed=0,
                          split=SimpleNamespace(private_classes=tuple(range(10))))
    for row in accuracy.ROWS:
        if row.protocol == "pooled":
            continue  # refused under record-level DP for its own reason (no participant to protect)
        for eps in ("8", "mixed"):
            config = parse_config(accuracy.cell_config("A1", row, eps, 0, quick=False, data_dir=None, rounds=None,
                                                       sets=()))
            protocol = get_protocol(config.protocol)(config.protocol_config(), ctx)
            assert unsafe_release_reasons(protocol, unit=config.privacy.unit, noise=config.privacy.noise) == [], row
    by_name = {(row.protocol, row.variant): row for row in accuracy.ROWS}
    private = accuracy.cell_config("A1", by_name["fedavg", "homogeneous cnn_s"], "inf", 0, quick=False, data_dir=None,
                                   rounds=None, sets=())
    assert "weighting" not in private.get("fedavg", {})  # the paper's sample weighting, without DP


@pytest.mark.skipif(not Path(FASHION_MNIST_DEFAULT_DIR, "train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist not installed (the refusals are checked on A1's real split)")
def test_every_row_has_the_same_declared_budget(accuracy):
    """30 rounds and one warm start for every A1 row, except where the protocol refuses a warm start."""
    from securefl.config import parse_config

    for row in accuracy.ROWS:
        raw = accuracy.cell_config("A1", row, "inf", 0, quick=False, data_dir=None, rounds=None, sets=())
        assert raw["run"]["rounds"] == 30
        config = parse_config(raw, "t")
        assert config.training.warm_start == row.warm_start
        assert (config.training.warm_start_max_epochs, config.training.warm_start_patience) == (10, 2)
        if not row.warm_start:
            # Only a protocol that cannot be warm-started goes without: check it says so.
            from securefl.runtime.federation import build_world

            *_, protocol = build_world(config, "t")
            assert protocol.warm_start_refusal() is not None, f"{row.protocol}/{row.variant} could warm start"
    local = next(r for r in accuracy.ROWS if r.protocol == "local_only")
    raw = accuracy.cell_config("A1", local, "inf", 0, quick=False, data_dir=None, rounds=None, sets=())
    # local-only's own first fit is the warm start the others get.
    assert (raw["local_only"]["max_epochs_first"], raw["local_only"]["patience"]) == (10, 2)


def test_the_rows_knobs_are_those_chosen_on_validation(accuracy):
    """accuracy.py's per-protocol knobs are the best candidates of benchmarks/results/tune.json."""
    import importlib.util

    path = ROOT / "benchmarks" / "results" / "tune.json"
    if not path.exists():
        pytest.fail("benchmarks/results/tune.json is missing: run benchmarks/tune.py")
    spec = importlib.util.spec_from_file_location("tune_benchmark", ROOT / "benchmarks" / "tune.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    best = tune.best_knobs(json.loads(path.read_text())["items"])
    for key, knobs in best.items():
        protocol, variant, epsilon = tune.grid_key(key)
        row = accuracy.find_row(protocol, variant)
        raw = accuracy.cell_config("A1", row, epsilon, 0, quick=False, data_dir=None, rounds=None, sets=())
        for item in knobs:
            path_, _, value = item.partition("=")
            section, name = path_.split(".")
            expected = yaml.safe_load(value)  # as --set reads it
            assert raw[section].get(name) == expected, f"{key}: {item} chosen on validation, row has {raw[section][name]}"
