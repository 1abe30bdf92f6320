"""FML: optimizer parity, the reference's step decay of the lr, and the own-distribution score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from securefl.config import ConfigError, deep_merge
from securefl.core.training import PlainTrainer, accuracy, own_distribution_accuracy
from securefl.protocols.fml import FML, decayed_learning_rate
from securefl.runtime.federation import Federation
from tests.conftest import tiny_config

PARITY = {"optimizer": "adam", "lr": 0.001, "weight_decay": 0, "batch_size": 64}


def _fed(tmp_path: Path, **changes: Any) -> Federation:
    return Federation(tiny_config(**deep_merge({"protocol": "fml"}, changes)), tmp_path / "run", progress=False)


class _LrRecorder(PlainTrainer):
    """Records, at each fit, the optimizer's kind and each model's (lr, weight_decay), and the batch size."""

    def __init__(self, party) -> None:  # type: ignore[no-untyped-def]
        self.party = party
        self.calls: list[dict[str, Any]] = []

    def fit(self, model, optimizer, x, y, **kwargs):  # type: ignore[no-untyped-def, override]
        local = {id(p) for p in self.party.model.parameters()}
        meme = {id(p) for p in self.party.state["meme"].parameters()}
        seen: dict[str, set[tuple[float, float]]] = {"local": set(), "meme": set()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                which = "local" if id(p) in local else "meme" if id(p) in meme else "other"
                seen.setdefault(which, set()).add((group["lr"], group["weight_decay"]))
        self.calls.append({"kind": type(optimizer).__name__, "batch_size": kwargs["batch_size"], **seen})
        return super().fit(model, optimizer, x, y, **kwargs)


def _train_round(fed: Federation, party, rnd: int) -> None:  # type: ignore[no-untyped-def]
    fed.protocol.client_step(party, [], rnd)


# ----- the reference's step decay ---------------------------------------------------------------------
def test_step_decay_is_the_references_thirds_schedule() -> None:
    # R = 30: trigger int(30/3) = 10, so lr is divided by 10 before zero-based rounds 10 and 20.
    lrs = [decayed_learning_rate(0.01, rnd, rounds=30, decay=0.1, every=None, stop=50) for rnd in range(1, 31)]
    assert lrs[:10] == [0.01] * 10
    assert lrs[10:20] == pytest.approx([0.001] * 10)
    assert lrs[20:] == pytest.approx([0.0001] * 10)
    # R = 50 (the reference's default): decays before zero-based rounds 16, 32 and 48 (one-based 17, 33, 49).
    r50 = [decayed_learning_rate(1.0, rnd, rounds=50, decay=0.1, every=None, stop=50) for rnd in (16, 17, 33, 48, 49)]
    assert r50 == pytest.approx([1.0, 0.1, 0.01, 0.01, 0.001])


def test_step_decay_stops_at_stop_and_explicit_period_and_short_runs() -> None:
    # stop_decay = 15: the decay due before zero-based round 20 is skipped.
    assert decayed_learning_rate(1.0, 25, rounds=30, decay=0.1, every=None, stop=15) == pytest.approx(0.1)
    assert decayed_learning_rate(1.0, 25, rounds=30, decay=0.1, every=None, stop=None) == pytest.approx(0.01)
    assert decayed_learning_rate(1.0, 7, rounds=30, decay=0.5, every=3, stop=None) == pytest.approx(0.25)
    # Fewer than 3 rounds: int(R/3) = 0, where the reference divides by zero; here no decay.
    assert decayed_learning_rate(1.0, 2, rounds=2, decay=0.1, every=None, stop=50) == 1.0
    # lr_decay = 1 switches it off.
    assert decayed_learning_rate(0.3, 30, rounds=30, decay=1.0, every=None, stop=50) == 0.3


def test_both_models_train_at_the_decayed_rate_across_forks_and_a_resume(tmp_path: Path) -> None:
    # 6 rounds: decays before zero-based rounds 2 and 4, i.e. at one-based rounds 3 and 5.
    fed = _fed(tmp_path / "a", run={"rounds": 6}, fml={"lr": 0.1})
    party = fed.parties[0]
    recorder = _LrRecorder(party)
    party.trainer = recorder
    for rnd in range(1, 7):
        _train_round(fed, party, rnd)  # the meme's optimizer state is reset at every fork
    expected = [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    for call, lr in zip(recorder.calls, expected, strict=True):
        assert [v[0] for v in call["local"]] == [pytest.approx(lr)]
        assert [v[0] for v in call["meme"]] == [pytest.approx(lr)]
        assert "other" not in call
    # A resumed run (fresh optimizer, first round trained is 5) trains at the unbroken run's rate.
    resumed = _fed(tmp_path / "b", run={"rounds": 6}, fml={"lr": 0.1})
    other = _LrRecorder(resumed.parties[0])
    resumed.parties[0].trainer = other
    _train_round(resumed, resumed.parties[0], 5)
    assert other.calls[0]["local"] == recorder.calls[4]["local"]
    assert other.calls[0]["meme"] == recorder.calls[4]["meme"]


def test_owner_lr_is_decayed_too(tmp_path: Path) -> None:
    participants = [{"id": "p0", "model": "cnn_s", "lr": 0.5}, {"id": "p1", "model": "mlp_s"}]
    fed = _fed(tmp_path, run={"rounds": 3}, participants=participants)
    proto: FML = fed.protocol  # type: ignore[assignment]
    assert proto.learning_rate(fed.parties[0], 1) == 0.5
    assert proto.learning_rate(fed.parties[0], 2) == pytest.approx(0.05)
    assert proto.learning_rate(fed.parties[1], 2) == pytest.approx(0.001)


# ----- optimizer parity -----------------------------------------------------------------------------
def test_parity_settings_reach_both_models_optimizer_and_the_batches(tmp_path: Path) -> None:
    fed = _fed(tmp_path, run={"rounds": 2}, fml={**PARITY, "lr_decay": 1.0})
    party = fed.parties[0]
    recorder = _LrRecorder(party)
    party.trainer = recorder
    _train_round(fed, party, 1)
    _train_round(fed, party, 2)
    for call in recorder.calls:
        assert call["kind"] == "Adam" and call["batch_size"] == 64
        assert call["local"] == call["meme"] == {(0.001, 0.0)}


def test_reference_defaults_are_sgd_with_momentum_and_weight_decay(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    opt = fed.parties[0].state["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups] == [(0.01, 0.9, 5e-4)]
    cfg = fed.protocol.config
    assert (cfg.batch_size, cfg.lr_decay, cfg.lr_decay_every, cfg.lr_decay_stop) == (128, 0.1, None, 50)


def test_bad_decay_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"fml\.lr_decay"):
        tiny_config(protocol="fml", fml={"lr_decay": 0})
    with pytest.raises(ConfigError, match=r"fml\.lr_decay_every"):
        tiny_config(protocol="fml", fml={"lr_decay_every": 0})


# ----- own-distribution accuracy ---------------------------------------------------------------------
class _AlwaysClass(nn.Module):
    def __init__(self, label: int, num_classes: int = 10) -> None:
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), self.num_classes)
        logits[:, self.label] = 1.0
        return logits


def test_a_model_perfect_on_the_owners_only_class_scores_one() -> None:
    y = torch.arange(10).repeat_interleave(5)  # a balanced test set
    x = torch.zeros(len(y), 1)
    model = _AlwaysClass(0)  # right on class 0, wrong everywhere else
    only_zero = torch.zeros(10)
    only_zero[0] = 7
    assert own_distribution_accuracy(model, x, y, only_zero) == 1.0
    assert accuracy(model, x, y) == pytest.approx(0.1)
    # Uniform counts give the balanced accuracy; 3:1 between classes 0 and 1 gives 0.75.
    assert own_distribution_accuracy(model, x, y, torch.ones(10)) == pytest.approx(0.1)
    assert own_distribution_accuracy(model, x, y, torch.tensor([3.0, 1] + [0] * 8)) == pytest.approx(0.75)
    # A class the owner holds but the test set lacks is dropped, not counted as wrong.
    no_two = y != 2
    assert own_distribution_accuracy(model, x[no_two], y[no_two], torch.tensor([1.0, 0, 5] + [0] * 7)) == 1.0


def test_evaluate_reports_both_models_on_the_owners_distribution(tmp_path: Path) -> None:
    fed = _fed(tmp_path, run={"rounds": 1})
    party = fed.parties[0]
    _train_round(fed, party, 1)
    metrics = fed.protocol.evaluate(party)
    assert set(metrics) == {"accuracy", "own_distribution_accuracy", "meme_accuracy",
                            "meme_own_distribution_accuracy"}
    x, y = fed.ctx.test_x, fed.ctx.test_y
    counts = party.train.label_counts(10).float()
    for key, model in (("own_distribution_accuracy", party.model), ("meme_own_distribution_accuracy",
                                                                     party.state["meme"])):
        # By hand: per-class test accuracy, weighted by the owner's training label shares.
        per_class = torch.tensor([accuracy(model, x[y == c], y[y == c]) for c in range(10)])
        assert metrics[key] == pytest.approx(float((per_class * counts).sum() / counts.sum()))
    assert metrics["accuracy"] == accuracy(party.model, x, y)


def test_own_distribution_scores_are_withheld_under_dp(tmp_path) -> None:
    """They read the owner's label shares, which no DP mechanism protects: a private run never reports them."""
    import json

    from securefl.config import parse_config
    from securefl.runtime.federation import Federation

    raw = {"protocol": "fml", "run": {"seed": 0, "rounds": 1}, "data": {"dataset": "digits"},
           "fml": {"meme_model": "mlp_s", "batch_size": 64},
           "participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]}
    plain = Federation(parse_config(raw, "t"), tmp_path / "plain", progress=False).run()
    assert all("own_distribution_accuracy" in p for p in plain["participants"])
    raw["privacy"] = {"unit": "record", "target_epsilon": 8.0, "delta": 1e-3}
    Federation(parse_config(raw, "t"), tmp_path / "dp", progress=False).run()
    for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines():
        for metrics in json.loads(line)["participants"].values():
            assert "own_distribution_accuracy" not in metrics and "meme_own_distribution_accuracy" not in metrics
            assert "accuracy" in metrics and "meme_accuracy" in metrics
