"""FedGen: optimizer parity, the reference's early_stop, and homogeneous full sharing (and its FedAvg limit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from securefl.config import ConfigError
from securefl.core.training import PlainTrainer, TrainStats, accuracy
from securefl.protocols.base import flat_parameters
from securefl.protocols.fedgen_common import FedGen
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config
from tests.protocols.test_fedgen import _one_thread  # noqa: F401  (autouse: one torch thread in this module too)

FAST = {"local_steps": 5, "generator_steps": 10}
SAME = [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]




def _federation(tmp_path: Path, **changes: Any) -> Federation:
    fedgen = changes.pop("fedgen", {})
    return Federation(tiny_config(protocol="fedgen", fedgen=fedgen, **changes), tmp_path / "run", progress=False)


class _StepTrainer(PlainTrainer):
    """Counts each fit's steps, and the optimizer it was given."""

    def __init__(self) -> None:
        self.stats: list[TrainStats] = []
        self.optimizers: list[tuple[str, float]] = []

    def fit(self, model, optimizer, x, y, **kwargs):  # type: ignore[no-untyped-def, override]
        self.optimizers.append((type(optimizer).__name__, optimizer.param_groups[0]["lr"]))
        stats = super().fit(model, optimizer, x, y, **kwargs)
        self.stats.append(stats)
        return stats


def _count_generator_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts forward passes of every user-side copy of G (reference mode: users never train G)."""
    calls = [0]
    original = FedGen._generator_from

    def counted(self, flat):  # type: ignore[no-untyped-def]
        generator = original(self, flat)
        generator.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return generator

    monkeypatch.setattr(FedGen, "_generator_from", counted)
    return calls


# ----- optimizer parity --------------------------------------------------------------------------------
def test_reference_optimizer_is_plain_sgd(tmp_path: Path) -> None:
    fed = _federation(tmp_path, fedgen=FAST)
    opt = fed.parties[0].state["private_opt"]
    assert isinstance(opt, torch.optim.SGD)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups] == [(0.01, 0.0, 0.0)]


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_adam_and_momentum_sgd_with_the_per_round_decay(tmp_path: Path, kind: str) -> None:
    fed = _federation(tmp_path, fedgen={**FAST, "optimizer": kind, "lr": 0.001, "momentum": 0.5,
                                        "weight_decay": 1e-4, "lr_decay": 0.5}, run={"rounds": 3})
    trainers = [_StepTrainer() for _ in fed.parties]
    for party, trainer in zip(fed.parties, trainers, strict=True):
        party.trainer = trainer
    fed.run()
    opt = fed.parties[0].state["private_opt"]
    assert type(opt).__name__ == ("Adam" if kind == "adam" else "SGD")
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    if kind == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.5
    # Each round trains at lr · 0.5^(round − 1), whichever optimizer; round 1 is one (plain) fit.
    lrs = sorted({lr for _, lr in trainers[0].optimizers}, reverse=True)
    assert lrs == pytest.approx([0.001, 0.0005, 0.00025])


# ----- the reference's early_stop ---------------------------------------------------------------------
@pytest.mark.parametrize(("early_stop", "regularised"), [(3, 3), (None, 7), (0, 0), (50, 7)])
def test_generator_terms_ride_on_the_first_early_stop_steps_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  early_stop: int | None, regularised: int) -> None:
    calls = _count_generator_calls(monkeypatch)
    fed = _federation(tmp_path, fedgen={"mode": "reference", "local_steps": 7, "generator_steps": 2,
                                        "early_stop": early_stop}, run={"rounds": 2})
    trainers = [_StepTrainer() for _ in fed.parties]
    for party, trainer in zip(fed.parties, trainers, strict=True):
        party.trainer = trainer
    fed.run()
    # Round 1 has no regulariser; in round 2 each regularised step samples G twice (the latent KL on
    # the batch's labels, and the generated CE), for each of the 3 users.
    assert calls[0] == 3 * 2 * regularised
    for party, trainer in zip(fed.parties, trainers, strict=True):
        steps = [s.steps for s in trainer.stats]
        assert sum(steps) == 2 * 7  # the plan's total is what is trained ...
        plan = fed.protocol.private_training_plan(party)
        assert plan == [(32, None, 2 * 7)]  # ... and it does not depend on early_stop
        assert steps == [7] + [s for s in (regularised, 7 - regularised) if s > 0]


def test_only_the_beta_term_still_counts_as_regularised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_generator_calls(monkeypatch)
    fed = _federation(tmp_path, fedgen={"mode": "reference", "local_steps": 6, "generator_steps": 2,
                                        "early_stop": 4, "generative_alpha": 0}, run={"rounds": 2})
    fed.run()
    assert calls[0] == 3 * 1 * 4  # one sample of G per regularised step: the latent KL only


def test_local_epochs_train_fedavgs_number_of_steps_and_plan_them(tmp_path: Path) -> None:
    fed = _federation(tmp_path, fedgen={**FAST, "local_epochs": 2, "batch_size": 16, "early_stop": 3},
                      run={"rounds": 2})
    trainers = [_StepTrainer() for _ in fed.parties]
    for party, trainer in zip(fed.parties, trainers, strict=True):
        party.trainer = trainer
    fed.run()
    for party, trainer in zip(fed.parties, trainers, strict=True):
        per_round = 2 * -(-party.num_samples // 16)
        assert [s.steps for s in trainer.stats] == [per_round, 3, per_round - 3]
        assert fed.protocol.private_training_plan(party) == [(16, None, 2 * per_round)]


def test_bad_schedule_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"fedgen\.early_stop"):
        tiny_config(protocol="fedgen", fedgen={"early_stop": -1})
    with pytest.raises(ConfigError, match=r"fedgen\.optimizer"):
        tiny_config(protocol="fedgen", fedgen={"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match=r"fedgen\.local_epochs"):
        tiny_config(protocol="fedgen", fedgen={"local_epochs": 0})


# ----- homogeneous full sharing ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["private", "reference"])
def test_homogeneous_full_sharing_runs_and_reports_the_global_model(tmp_path: Path, mode: str) -> None:
    fed = _federation(tmp_path, fedgen={**FAST, "mode": mode, "share": "full", "optimizer": "adam", "lr": 0.003,
                                        "local_epochs": 1}, participants=SAME, run={"rounds": 2})
    summary = fed.run()
    ctx = fed.ctx
    metrics = [fed.protocol.evaluate(p) for p in fed.parties]
    global_models = [fed.protocol.replica(p).shared for p in fed.parties]
    # Every user holds the same global (averaged) model, and accuracy is that model's.
    for model in global_models[1:]:
        torch.testing.assert_close(flat_parameters(model), flat_parameters(global_models[0]))
    for m in metrics:
        assert m["accuracy"] == accuracy(global_models[0], ctx.test_x, ctx.test_y)
    assert not torch.equal(flat_parameters(fed.parties[0].model), flat_parameters(global_models[0]))
    assert summary["mean_accuracy"] == pytest.approx(metrics[0]["accuracy"])
    assert metrics[0]["accuracy"] > 0.3  # two rounds on digits learn something


def test_warm_start_is_refused_whichever_part_is_shared(tmp_path: Path) -> None:
    """Every round starts from the averaged model (full) or the averaged head (head), which a model fitted
    alone was not fitted to."""
    full = _federation(tmp_path / "full", fedgen={**FAST, "share": "full"}, participants=SAME)
    assert "share = 'full'" in (full.protocol.warm_start_refusal() or "")
    head = _federation(tmp_path / "head", fedgen=FAST)
    assert "share = 'head'" in (head.protocol.warm_start_refusal() or "")


def test_without_generator_terms_full_sharing_is_fedavg_with_uniform_weights(tmp_path: Path) -> None:
    """α = β = 0, Adam, one epoch at FedAvg's batch: the same rounds as FedAvg (uniform weighting)."""
    training = {"optimizer": "adam", "lr": 0.001, "batch_size": 64, "weight_decay": 0.0, "local_epochs": 1}
    fedgen = {"share": "full", "generative_alpha": 0, "generative_beta": 0, "optimizer": "adam", "lr": 0.001,
              "weight_decay": 0.0, "batch_size": 64, "lr_decay": 1.0, "local_epochs": 1, "generator_steps": 3}
    gen = _federation(tmp_path / "gen", fedgen=fedgen, training=training, participants=SAME)
    avg = Federation(tiny_config(protocol="fedavg", fedavg={"weighting": "uniform"}, training=training,
                                 participants=SAME), tmp_path / "avg", progress=False)
    # Paired rows: whole-model FedGen starts from FedAvg's global initialisation.
    for party in gen.parties:
        assert torch.equal(flat_parameters(gen.protocol.replica(party).shared),
                           flat_parameters(avg.protocol.global_model))
    for rnd in (1, 2):
        down = gen.protocol.open_round(rnd, [p.id for p in gen.parties])
        assert avg.protocol.open_round(rnd, [p.id for p in avg.parties]) is None
        gen_replies, avg_replies = [], []
        for g_party, a_party in zip(gen.parties, avg.parties, strict=True):
            torch.manual_seed(1000 * rnd + g_party.index)
            gen_replies.append(gen.protocol.client_step(g_party, [down[g_party.id]], rnd))
            torch.manual_seed(1000 * rnd + a_party.index)
            avg_replies.append(avg.protocol.client_step(a_party, [], rnd))
        for g, a in zip(gen_replies, avg_replies, strict=True):
            torch.testing.assert_close(g.tensor("shared"), a.tensor("weights"), rtol=0, atol=0)
        gen_down = gen.protocol.server_step(rnd, gen_replies, gen.aggregator)
        avg_down = avg.protocol.server_step(rnd, avg_replies, avg.aggregator)
        for g_party, a_party in zip(gen.parties, avg.parties, strict=True):
            gen.protocol.client_update(g_party, [gen_down[g_party.id]], rnd)
            avg.protocol.client_update(a_party, [avg_down], rnd)
        torch.testing.assert_close(flat_parameters(gen.protocol.replica(gen.parties[0]).shared),
                                   flat_parameters(avg.protocol.global_model), rtol=0, atol=0)
