"""FML: the contract, plus behaviour the paper implies (and the traps of the code in circulation)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from securefl.config import ConfigError, deep_merge, load_config
from securefl.core.message import Message
from securefl.core.training import PlainTrainer, accuracy, make_optimizer
from securefl.protocols import ProtocolSetupError
from securefl.protocols.base import flat_parameters
from securefl.protocols.fml import FML, mutual_losses
from securefl.runtime.federation import Federation
from tests.conftest import metrics_without_time, tiny_config
from tests.protocols.contract import ProtocolContract, RecordingTransport

ROOT = Path(__file__).resolve().parents[2]
SAME_MODELS = {"participants": [{"id": f"p{i}", "model": "cnn_s"} for i in range(3)]}


@pytest.fixture(autouse=True)
def _one_intra_op_thread():  # type: ignore[no-untyped-def]
    # These models are tiny: on a shared 2-core machine torch's intra-op threads only spin against
    # each other (a round measured ~40x slower with 2 threads than with 1). Restored after each test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TestFMLContract(ProtocolContract):
    protocol = "fml"


def _fed(tmp_path: Path, **changes: Any) -> Federation:
    return Federation(tiny_config(**deep_merge({"protocol": "fml"}, changes)), tmp_path / "run", progress=False)


def _meme(party) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    return party.state["meme"]


def _round(fed: Federation, rnd: int = 1) -> tuple[list[Message], Message]:
    """One full-participation round driven by hand: fork, mutual training, merge, load."""
    proto: FML = fed.protocol  # type: ignore[assignment]
    assert proto.open_round(rnd, [p.id for p in fed.parties]) is None  # everyone already holds the global meme
    replies = []
    for party in fed.parties:
        torch.manual_seed(100 + party.index)
        replies.append(proto.client_step(party, [], rnd))
    down = proto.server_step(rnd, replies, fed.aggregator)
    for party in fed.parties:
        proto.client_update(party, [down], rnd)
    return replies, down


# ----- aggregation ----------------------------------------------------------------------------
def test_merge_gives_every_client_the_uniform_mean_of_the_uploaded_memes(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    replies, _ = _round(fed)
    uploaded = [r.tensor("meme") for r in replies]
    assert not torch.equal(uploaded[0], uploaded[1]) and not torch.equal(uploaded[1], uploaded[2])
    by_hand = (uploaded[0] + uploaded[1] + uploaded[2]) / 3
    for party in fed.parties:
        torch.testing.assert_close(flat_parameters(_meme(party)), by_hand)
    torch.testing.assert_close(fed.protocol.latest, by_hand)  # type: ignore[attr-defined]
    assert all("num_samples" not in r.meta for r in replies)  # uniform weights need no sample counts


def test_sample_weighted_merge_weights_each_meme_by_its_training_records(tmp_path: Path) -> None:
    fed = _fed(tmp_path, fml={"weighting": "samples"})
    replies, _ = _round(fed)
    counts = [float(p.num_samples) for p in fed.parties]
    assert len(set(counts)) == 3  # Dirichlet silos of different sizes, so the weights matter
    assert [r.meta["num_samples"] for r in replies] == [p.num_samples for p in fed.parties]
    by_hand = sum(n * r.tensor("meme") for n, r in zip(counts, replies, strict=True)) / sum(counts)
    for party in fed.parties:
        torch.testing.assert_close(flat_parameters(_meme(party)), by_hand)
    uniform = sum(r.tensor("meme") for r in replies) / 3
    assert not torch.allclose(by_hand, uniform)


def test_integer_buffers_are_never_averaged_and_float_buffers_are(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    n_float = flat_parameters(_meme(fed.parties[0])).numel()
    for i, party in enumerate(fed.parties):
        _meme(party).register_buffer("counter", torch.tensor([100 + i], dtype=torch.long))
        _meme(party).register_buffer("running", torch.tensor([float(i)]))
    replies, _ = _round(fed)
    assert all(r.tensor("meme").numel() == n_float + 1 for r in replies)  # the float buffer travels, the counter not
    for i, party in enumerate(fed.parties):
        assert _meme(party).counter.dtype == torch.long and int(_meme(party).counter) == 100 + i
        torch.testing.assert_close(_meme(party).running, torch.tensor([1.0]))  # (0 + 1 + 2) / 3


# ----- what crosses the wire ------------------------------------------------------------------
def test_no_message_carries_a_local_model(tmp_path: Path) -> None:
    transport = RecordingTransport()
    config = tiny_config(protocol="fml", fml={"meme_model": "mlp_m"})
    fed = Federation(config, tmp_path / "run", progress=False, transport=transport)
    local_sizes = {flat_parameters(p.model).numel() for p in fed.parties}  # type: ignore[arg-type]
    meme_size = flat_parameters(_meme(fed.parties[0])).numel()
    assert meme_size not in local_sizes  # so sizes tell the two kinds of model apart
    fed.run()
    assert transport.sent
    for msg in transport.sent:
        for value in msg.payload.values():
            assert value.numel() == meme_size, (msg.kind, value.numel())
    uplinks = [m for m in transport.sent if m.kind == "meme"]
    assert len(uplinks) == 2 * 3


def test_run_federates_memes_while_local_models_stay_personal(tmp_path: Path) -> None:
    # One architecture for every local model and the meme, so sizes cannot tell them apart:
    # only the algorithm keeps the local models out of the merge.
    fed = _fed(tmp_path, **SAME_MODELS)
    start = flat_parameters(_meme(fed.parties[0]))
    fed.run()
    memes = [flat_parameters(_meme(p)) for p in fed.parties]
    locals_ = [flat_parameters(p.model) for p in fed.parties]  # type: ignore[arg-type]
    assert not torch.equal(memes[0], start)
    for meme in memes:
        assert torch.equal(meme, fed.protocol.latest)  # type: ignore[attr-defined]
    for i in range(3):
        assert not torch.allclose(locals_[i], memes[i])
        for j in range(i + 1, 3):
            assert not torch.allclose(locals_[i], locals_[j])


def test_a_client_that_sat_out_forks_the_latest_merge_before_training(tmp_path: Path) -> None:
    fed = _fed(tmp_path, run={"rounds": 4, "participation": 0.67})
    sampled = [set(fed.sample(r)) for r in range(1, 5)]
    assert any(pid not in sampled[r - 1] and pid in sampled[r] for r in range(1, 4) for pid in sampled[r]), \
        "the seeded sampling never brings back a client that sat out; pick another seed"
    proto: FML = fed.protocol  # type: ignore[assignment]
    initial = flat_parameters(_meme(fed.parties[0]))
    checked: list[str] = []

    class ForkChecker(PlainTrainer):
        def __init__(self, pid: str) -> None:
            self.pid = pid

        def fit(self, model, optimizer, x, y, **kwargs):  # type: ignore[no-untyped-def]
            expected = initial if proto.latest is None else proto.latest
            torch.testing.assert_close(flat_parameters(model.meme), expected)
            checked.append(self.pid)
            return super().fit(model, optimizer, x, y, **kwargs)

    for party in fed.parties:
        party.trainer = ForkChecker(party.id)
    fed.run()
    assert len(checked) == 4 * 2
    # The fork and the merge are different kinds, so the signing layer takes neither for a replay.
    assert all(not row.get("rejected") for row in metrics_without_time(tmp_path / "run"))


@pytest.mark.parametrize("scheme", ["masking", "ckks"])
def test_secure_aggregation_gives_the_plain_merge(tmp_path: Path, scheme: str) -> None:
    """The server only forwards the merge (so CKKS, where it cannot read it, works too), sample weights
    are declared for masking's pre-weighting, and a sat-out client's fork is the sealed merge again."""
    changes = {"run": {"rounds": 3, "participation": 0.67}, "fml": {"weighting": "samples"}}
    memes = {}
    for name in ("none", scheme):
        fed = _fed(tmp_path / name, secure_aggregation=name, **changes)
        fed.run()
        assert all(not row.get("rejected") for row in metrics_without_time(tmp_path / name / "run"))
        memes[name] = [flat_parameters(_meme(p)) for p in fed.parties]
    for plain, secure in zip(memes["none"], memes[scheme], strict=True):
        torch.testing.assert_close(secure, plain, atol=1e-5, rtol=0)


# ----- the mutual-learning losses -----------------------------------------------------------------
def _batch(num_classes: int = 10, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    z_local = torch.randn(batch, num_classes, generator=gen) * 2
    z_meme = torch.randn(batch, num_classes, generator=gen) * 2
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return z_local, z_meme, y


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # the weak form is used on purpose
def test_kl_term_is_batchmean_not_the_c_fold_weaker_mean() -> None:
    z_local, z_meme, y = _batch()
    batch, num_classes = z_local.shape
    loss_local, loss_meme = mutual_losses(z_local, z_meme, y, alpha=0.0, beta=0.0)
    p_l, p_m = z_local.softmax(1), z_meme.softmax(1)
    kl_m_l = (p_m * (p_m.log() - p_l.log())).sum() / batch  # KL(p_m || p_l), summed over classes, mean over batch
    kl_l_m = (p_l * (p_l.log() - p_m.log())).sum() / batch
    torch.testing.assert_close(loss_local, kl_m_l)
    torch.testing.assert_close(loss_meme, kl_l_m)
    weak = F.kl_div(F.log_softmax(z_local, 1), F.softmax(z_meme, 1), reduction="mean")
    torch.testing.assert_close(loss_local, num_classes * weak)


def test_losses_weight_cross_entropy_by_alpha_and_beta() -> None:
    z_local, z_meme, y = _batch()
    loss_local, loss_meme = mutual_losses(z_local, z_meme, y, alpha=0.3, beta=0.8)
    kl_local, kl_meme = mutual_losses(z_local, z_meme, y, alpha=0.0, beta=0.0)
    torch.testing.assert_close(loss_local, 0.3 * F.cross_entropy(z_local, y) + 0.7 * kl_local)
    torch.testing.assert_close(loss_meme, 0.8 * F.cross_entropy(z_meme, y) + 0.2 * kl_meme)


def test_no_gradient_crosses_between_the_two_models() -> None:
    z_local, z_meme, y = _batch()
    z_local.requires_grad_(True)
    z_meme.requires_grad_(True)
    loss_local, loss_meme = mutual_losses(z_local, z_meme, y, alpha=0.5, beta=0.5)
    grad_own, grad_other = torch.autograd.grad(loss_local, [z_local, z_meme], allow_unused=True)
    assert grad_own is not None and grad_own.abs().sum() > 0 and grad_other is None
    grad_other, grad_own = torch.autograd.grad(loss_meme, [z_local, z_meme], allow_unused=True)
    assert grad_own is not None and grad_own.abs().sum() > 0 and grad_other is None


@pytest.mark.parametrize("which", ["local", "meme"])
def test_weight_one_on_cross_entropy_is_plain_training_on_the_same_batches(tmp_path: Path, which: str) -> None:
    """With α = 1 the local model ignores the meme (and with β = 1 the meme ignores the local model):
    its update equals plain cross-entropy training, step for step, on the same minibatches. With the
    paper's 0.5 it does not, so the mutual term is live."""
    key = "alpha" if which == "local" else "beta"
    results = {}
    for weight in (1.0, 0.5):
        fed = _fed(tmp_path / str(weight), training={"local_epochs": 2}, fml={key: weight, "batch_size": 64})
        cfg, party = fed.protocol.config, fed.parties[0]  # type: ignore[attr-defined]
        model = party.model if which == "local" else _meme(party)
        reference = copy.deepcopy(model)
        opt = make_optimizer(reference, kind=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                             weight_decay=cfg.weight_decay)
        torch.manual_seed(7)
        fed.protocol.client_step(party, [], 1)
        torch.manual_seed(7)  # the same shuffles, hence the same minibatches
        stats = PlainTrainer().fit(reference, opt, party.train.x, party.train.y, batch_size=64, epochs=2)
        assert stats.steps >= 4
        results[weight] = (flat_parameters(model), flat_parameters(reference))
    torch.testing.assert_close(*results[1.0])
    assert not torch.allclose(*results[0.5])


# ----- one private loop, and the optimizers -------------------------------------------------------
class _OptimizerRecorder(PlainTrainer):
    """Records, at each private-training call, what is trained and which parameters carry optimizer state."""

    def __init__(self, party) -> None:  # type: ignore[no-untyped-def]
        self.party = party
        self.calls: list[dict[str, Any]] = []

    def fit(self, model, optimizer, x, y, **kwargs):  # type: ignore[no-untyped-def]
        local = {id(p) for p in self.party.model.parameters()}
        meme = {id(p) for p in _meme(self.party).parameters()}
        with_state = {id(p) for p in optimizer.state}
        self.calls.append({
            "payload": kwargs["payload"],
            "trained": {id(p) for p in model.parameters()},
            "optimized": {id(p) for g in optimizer.param_groups for p in g["params"]},
            "both": local | meme,
            "local_state": local <= with_state,
            "meme_state": bool(meme & with_state),
        })
        return super().fit(model, optimizer, x, y, **kwargs)


@pytest.mark.parametrize("reset", [True, False])
def test_both_models_train_in_one_trainer_call_and_the_meme_optimizer_resets_at_fork(tmp_path: Path,
                                                                                     reset: bool) -> None:
    fed = _fed(tmp_path, fml={"reset_meme_optimizer": reset})
    recorder = _OptimizerRecorder(fed.parties[0])
    fed.parties[0].trainer = recorder
    _round(fed, 1)
    _round(fed, 2)
    calls = recorder.calls
    assert [c["payload"] for c in calls] == ["mutual_training"] * 2
    assert all(c["trained"] == c["optimized"] == c["both"] for c in calls)
    # Round 2: the local model's momentum survives; the meme's is cleared at the fork (reference).
    assert calls[1]["local_state"]
    assert calls[1]["meme_state"] is (not reset)


# ----- evaluation and configuration -------------------------------------------------------------------
def test_evaluate_reports_the_local_model_as_headline_and_the_meme_beside_it(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _round(fed)
    ctx = fed.ctx
    metrics = [fed.protocol.evaluate(party) for party in fed.parties]
    for party, m in zip(fed.parties, metrics, strict=True):
        assert m["accuracy"] == accuracy(party.model, ctx.test_x, ctx.test_y)  # type: ignore[arg-type]
        assert m["meme_accuracy"] == accuracy(_meme(party), ctx.test_x, ctx.test_y)
    assert len({m["meme_accuracy"] for m in metrics}) == 1  # everyone holds the merge
    assert len({m["accuracy"] for m in metrics}) > 1  # the local models are each client's own


def test_bad_settings_are_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fml\.meme_model = 'vgg16'.*allowed: mlp_s"):
        tiny_config(protocol="fml", fml={"meme_model": "vgg16"})
    with pytest.raises(ConfigError, match=r"fml\.alpha = 1\.5"):
        tiny_config(protocol="fml", fml={"alpha": 1.5})
    with pytest.raises(ConfigError, match=r"fml\.weighting"):
        tiny_config(protocol="fml", fml={"weighting": "median"})
    tabular = {"data": {"dataset": "breast_cancer", "public_size": 0},
               "participants": [{"id": f"p{i}", "model": "mlp_s"} for i in range(3)]}
    with pytest.raises(ProtocolSetupError, match=r"fml\.meme_model = 'cnn_s'.*convolutional"):
        _fed(tmp_path / "conv", **tabular)
    _fed(tmp_path / "mlp", **tabular, fml={"meme_model": "mlp_s"})  # an MLP meme fits tabular data


@pytest.mark.slow
def test_fml_local_models_beat_local_only_on_the_demo(tmp_path: Path) -> None:
    results = {}
    for name in ("fml", "local_only"):
        config = load_config(ROOT / "examples" / "digits_fml.yaml", [f"protocol={name}"])
        results[name] = Federation(config, tmp_path / name, progress=False).run()["mean_accuracy"]
    assert results["fml"] > results["local_only"], results
