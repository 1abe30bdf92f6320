"""The trainer's grad-sample mode (ghost clipping on all-Linear models, Opacus hooks otherwise) clips exactly as
Opacus's per-example hooks do, on every A1 zoo model; and the one-draw secure noise is shaped and scaled right."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

import securefl.privacy.dp_sgd as dp_sgd
from securefl.core.training import LookAhead, cross_entropy_loss
from securefl.models.zoo import build_model
from securefl.privacy.dp_sgd import DPSGDTrainer, _secure_noise, ghost_clipping_applies
from securefl.privacy.randomness import SecureRandom

A1_MODELS = ("cnn_s", "mlp_m", "resnet_s", "mlp_l", "deepcnn_s", "mlp_s")
CLIP = 0.5


class _Recording(torch.optim.SGD):
    """SGD at lr 0 that keeps the gradient handed to each step."""

    def __init__(self, params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, lr=0.0)
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        self.seen.append(torch.cat([p.grad.reshape(-1).clone() for g in self.param_groups for p in g["params"]]))
        return super().step(closure)


def _batch(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, (1, 28, 28), 10)


def _hooks_reference(name: str, x: torch.Tensor, y: torch.Tensor,
                     clip: float = CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """Opacus's per-example hooks + DPOptimizer, no noise: the clipped, summed, scaled gradient; and the norms."""
    model = _model(name)
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                      expected_batch_size=len(x), loss_reduction="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.cross_entropy(gsm(x), y).backward()
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in opt.grad_samples], dim=1).norm(dim=1)
        assert opt.pre_step()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    gsm._close()
    return grad, norms


def _no_noise(rng: SecureRandom, params: list[torch.Tensor], std: float):  # type: ignore[no-untyped-def]
    for p in params:
        yield torch.zeros_like(p)


@pytest.mark.parametrize("name", A1_MODELS)
def test_trainers_clipped_sum_equals_opacus_hooks(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _batch()
    # The clip bound at the median record norm: it binds for half the records and not for the others, so both
    # sides of the clip are compared.
    clip = float(_hooks_reference(name, x, y)[1].median())
    reference, norms = _hooks_reference(name, x, y, clip)
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    monkeypatch.setattr(dp_sgd, "_secure_noise", _no_noise)  # compare before noise
    model = _model(name)
    optimizer = _Recording(model.parameters())
    # batch_size = n: sample rate 1, so the Poisson sample is the whole batch and the expected batch is n.
    DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=clip, commit=lambda e: None).fit(
        model, optimizer, x, y, batch_size=len(x), steps=1)
    (ours,) = optimizer.seen
    assert float((ours - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_ghost_clipping_only_where_it_is_the_same_computation() -> None:
    # All-Linear models with the plain cross-entropy: ghost clipping; anything with conv / norm layers: hooks.
    assert {n: ghost_clipping_applies(_model(n), cross_entropy_loss, None) for n in A1_MODELS} == {
        "cnn_s": False, "mlp_m": True, "resnet_s": False, "mlp_l": True, "deepcnn_s": False, "mlp_s": True}
    mlp = _model("mlp_s")
    # A protocol's own loss (its per-record terms are not visible) or a look-ahead (two gradients per record,
    # clipped as one vector) needs the materialised per-example gradients.
    assert not ghost_clipping_applies(mlp, lambda m, xb, yb: F.cross_entropy(m(xb), yb), None)
    assert not ghost_clipping_applies(mlp, cross_entropy_loss, LookAhead(step=0.1, weight=0.5))


def test_public_term_is_added_unclipped_after_ghost_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _batch()
    reference, _ = _hooks_reference("mlp_s", x, y)
    monkeypatch.setattr(dp_sgd, "_secure_noise", _no_noise)
    model = _model("mlp_s")
    public = torch.cat([torch.full((p.numel(),), float(i + 1)) for i, p in enumerate(model.parameters())])

    def public_loss(m: torch.nn.Module) -> torch.Tensor:
        return sum((i + 1) * p.sum() for i, p in enumerate(m.parameters()))  # type: ignore[return-value]

    optimizer = _Recording(model.parameters())
    DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=CLIP, commit=lambda e: None).fit(
        model, optimizer, x, y, batch_size=len(x), steps=1, public_loss=public_loss)
    (ours,) = optimizer.seen
    assert float((ours - reference - public).abs().max()) <= 1e-5 * float(public.abs().max())


def test_ghost_path_takes_noise_only_steps_on_empty_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _batch(200)
    model = _model("mlp_s")
    assert ghost_clipping_applies(model, cross_entropy_loss, None)
    optimizer = _Recording(model.parameters())
    empty = []
    noise_only = DPSGDTrainer._noise_only_step

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        empty.append(1)
        return noise_only(self, *args, **kwargs)

    monkeypatch.setattr(DPSGDTrainer, "_noise_only_step", counting)
    # Sample rate 1/200: a Poisson batch is empty with probability (1 - 1/200)^200 ~ e^-1, so 60 steps have one
    # (all but ~1e-12), and each empty batch still releases a noise-only step through the ghost path's optimizer.
    stats = DPSGDTrainer(noise_multiplier=2.0, max_grad_norm=1.0, commit=lambda e: None).fit(
        model, optimizer, x, y, batch_size=1, steps=60)
    assert stats.steps == 60 == len(optimizer.seen) and 0 < len(empty) < 60
    for g in optimizer.seen:
        assert torch.isfinite(g).all() and float(g.abs().max()) > 0


def test_one_draw_noise_is_shaped_per_parameter_with_the_asked_std() -> None:
    params = [torch.empty(300, 200), torch.empty(7), torch.empty(5, 4, 3, 3), torch.empty(100_000)]
    noises = list(_secure_noise(SecureRandom(), params, 1.7))
    assert [n.shape for n in noises] == [p.shape for p in params]
    flat = torch.cat([n.reshape(-1) for n in noises]).double()
    assert flat.mean().abs() < 0.02 and flat.std().item() == pytest.approx(1.7, rel=0.01)
    # Each parameter gets its own slice of the stream, not a repeat of another's.
    assert not torch.equal(noises[0].reshape(-1)[:7], noises[1])


def test_combine_sees_the_ghost_clipped_private_gradient_and_sets_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _batch()
    reference, _ = _hooks_reference("mlp_s", x, y)
    monkeypatch.setattr(dp_sgd, "_secure_noise", _no_noise)
    model = _model("mlp_s")
    seen: list[torch.Tensor] = []

    def combine(private: torch.Tensor, public: torch.Tensor) -> torch.Tensor:
        seen.append(private.clone())
        return 2.0 * private + public

    optimizer = _Recording(model.parameters())
    DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=CLIP, commit=lambda e: None).fit(
        model, optimizer, x, y, batch_size=len(x), steps=1, public_loss=lambda m: next(m.parameters()).sum(),
        combine=combine)
    (private,), (step,) = seen, optimizer.seen
    tolerance = 1e-5 * float(reference.abs().max())
    assert float((private - reference).abs().max()) <= tolerance
    public = torch.zeros_like(reference)
    public[: next(model.parameters()).numel()] = 1.0
    assert float((step - 2.0 * reference - public).abs().max()) <= 2 * tolerance
