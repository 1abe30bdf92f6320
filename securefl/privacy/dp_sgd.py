"""Record-level DP: a DP-SGD trainer on Opacus, with the signature of the plain trainer.

The runtime injects one of these as ``party.trainer`` for a participant with a
record-level budget, so every protocol's private training (FedMD's revisit,
FML's meme, HeteroFL's local epochs, FedGen's local steps ...) becomes DP-SGD
with no change to the protocol file.

What it does, per ``fit`` call (Abadi et al. 2016, as in Opacus):

- Poisson sampling with ``sample_rate = batch_size / n_local``, as Opacus's
  ``UniformWithReplacementSampler`` does; an epoch is ``1 / sample_rate`` steps,
  as in Opacus. (A shuffled fixed-size batch would not match the accounting.)
- per-example gradients (Opacus ``GradSampleModule``), clipped to
  ``max_grad_norm`` and summed, plus Gaussian noise of std
  ``noise_multiplier * max_grad_norm`` (Opacus ``DPOptimizer``), divided by the
  expected batch size. Where it computes the same clipped sum faster, ghost
  clipping (Li et al. 2022, Opacus ``GradSampleModuleFastGradientClipping``)
  replaces the materialised per-example gradients: see :func:`ghost_clipping_applies`
  and ``benchmarks/results/grad_sample.md``;
- before the first step, the whole call is committed to the participant's
  ledger as one frozen event (``commit``): check-then-commit, write-ahead. If
  the ledger refuses (budget exceeded), nothing is trained.

Empty Poisson batches still take a noise-only step, as they must for the
accounting to hold.

The Poisson sample, the gradient noise, the noise-only steps and the label
histogram's noise all come from :class:`~securefl.privacy.randomness.SecureRandom`
(OS entropy), never from torch's global RNG: the host seeds that from the run's
seed, which the coordinator knows, so it could predict the sample (voiding
amplification) and regenerate the noise. Opacus's own ``secure_mode`` needs
torchcsprng, which is not available, hence the small optimizer subclass here.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from securefl.core.training import (
    BatchLoss,
    GradientCombine,
    LookAhead,
    PublicLoss,
    TrainStats,
    check_fit_arguments,
    cross_entropy_loss,
    fit_public,
    flatten_grads,
    set_flat_grad,
    trainable_parameters,
)
from securefl.privacy.events import AnyEvent, PrivacyEvent, PublicDataEvent
from securefl.privacy.randomness import SecureRandom

Commit = Callable[[AnyEvent], None]


@contextlib.contextmanager
def _quiet_hooks() -> Iterator[None]:
    """Opacus's backward hooks make torch warn on every backward of a model whose inputs need no gradient."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _secure_noise(rng: SecureRandom, params: list[torch.Tensor], std: float) -> Iterator[torch.Tensor]:
    """N(0, std²) noise shaped like each of ``params``, from one draw: a call per tensor costs more than the values."""
    flat = rng.normal((sum(p.numel() for p in params),), std=std, dtype=params[0].dtype if params else torch.float32)
    for p, noise in zip(params, flat.split([p.numel() for p in params]), strict=True):
        yield noise.view(p.shape).to(p.device)


class _SecureNoise:
    """DPOptimizer's ``add_noise`` with its Gaussian noise drawn from a :class:`SecureRandom`, not torch's RNG."""

    params: list[torch.nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: SecureRandom, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)  # type: ignore[call-arg]
        self._rng = rng

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)  # type: ignore[attr-defined]  # set by Opacus at run time
        sums = [p.summed_grad for p in self.params]  # type: ignore[attr-defined]  # set by Opacus at run time
        for p, noise in zip(self.params, _secure_noise(self._rng, sums, self.noise_multiplier * self.max_grad_norm),
                            strict=True):
            p.grad = (p.summed_grad + noise).view_as(p)  # type: ignore[attr-defined]  # set by Opacus at run time
            _mark_as_processed(p.summed_grad)  # type: ignore[attr-defined]  # set by Opacus at run time


class _SecureDPOptimizer(_SecureNoise, DPOptimizer):
    """Opacus's DPOptimizer (clips materialised per-example gradients), with secure noise."""


class _SecureGhostDPOptimizer(_SecureNoise, DPOptimizerFastGradientClipping):
    """Opacus's ghost-clipping optimizer (``p.grad`` is already the clipped sum), with secure noise."""


def ghost_clipping_applies(model: nn.Module, batch_loss: BatchLoss, lookahead: LookAhead | None) -> bool:
    """Whether ghost clipping gives this call the same clipped sum as per-example gradients, faster.

    Every layer with trainable parameters must be ``nn.Linear`` (Opacus gets its per-record norm from the
    layer's input and output gradient, never forming the per-record gradient; other layers fall back to
    materialising it and then ghost clipping's second backward pass is a net loss: 1.0-1.3x hooks on the zoo's
    convolutional nets). The loss must be the plain per-record cross-entropy, since ghost clipping reweights
    per-record losses and an arbitrary ``batch_loss`` returns only their batch mean. No look-ahead: it clips the
    sum of a record's gradients at two points as one vector, which needs both materialised.
    """
    if batch_loss is not cross_entropy_loss or lookahead is not None:
        return False
    layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return bool(layers) and all(type(m) is nn.Linear for m in layers)


class DPSGDTrainer:
    """DP-SGD over a participant's private data; spends are committed through ``commit``."""

    name = "dp_sgd"

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, commit: Commit,
                 histogram_noise_multiplier: float = 10.0) -> None:
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier}")
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.commit = commit
        self.histogram_noise_multiplier = histogram_noise_multiplier

    def validation(self, score: Callable[[], float]) -> None:
        """No selection on private validation records: choosing when to stop, or which weights to keep, by
        the score of held-out private records is a release that no ledger entry covers (those records are
        not even in DP-SGD's sample). A DP participant trains the epochs its noise was calibrated for and
        keeps its latest weights, so its ε is exactly what was planned and booked."""
        return None

    def label_histogram(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Label counts released with the Gaussian mechanism at sensitivity 1 (adding or removing one record
        moves one count by one), committed to the ledger before they exist outside this call. The noise is
        fresh OS entropy (see :mod:`securefl.privacy.randomness`), so the caller passes no generator."""
        from securefl.privacy.mechanisms import gaussian_histogram

        counts = torch.bincount(labels, minlength=num_classes)
        noised, event = gaussian_histogram(counts, noise_multiplier=self.histogram_noise_multiplier)
        self.commit(event)
        return noised.float()

    @staticmethod
    def steps_for(n: int, *, batch_size: int, epochs: int | None = None, steps: int | None = None) -> int:
        """DP-SGD steps a call will take: epochs * (1 / q) as in Opacus, or ``steps``."""
        if steps is not None:
            return steps
        assert epochs is not None
        sample_rate = min(1.0, batch_size / n)
        return epochs * max(1, int(1 / sample_rate))

    def fit(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
            batch_size: int, epochs: int | None = None, steps: int | None = None,
            batch_loss: BatchLoss = cross_entropy_loss, max_grad_norm: float | None = None,
            payload: str = "private_training", public_loss: PublicLoss | None = None,
            combine: GradientCombine | None = None, lookahead: LookAhead | None = None) -> TrainStats:
        # ``max_grad_norm`` of the plain trainer is an optimisation knob; here clipping is the
        # privacy mechanism, so the trainer's own bound always applies.
        del max_grad_norm
        check_fit_arguments(epochs=epochs, steps=steps, public_loss=public_loss, combine=combine, lookahead=lookahead)
        n = len(x)
        if n == 0:
            return TrainStats(0, 0, float("nan"))
        sample_rate = min(1.0, batch_size / n)
        total_steps = self.steps_for(n, batch_size=batch_size, epochs=epochs, steps=steps)
        event = PrivacyEvent.dp_sgd(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate,
                                    steps=total_steps, clip_norm=self.max_grad_norm, payload=payload)
        # Write-ahead: the spend is on disk before any gradient touches the model.
        self.commit(event)

        expected_batch = sample_rate * n
        # One secret stream per call for the sample and one for the noise: neither follows from the run's seed.
        sampling, noise = SecureRandom(), SecureRandom()
        # The look-ahead point's per-record gradients come from a copy of the model that holds theta' (its own
        # per-sample hooks), so neither pass's activations mix into the other's. The copy's buffers stay those of
        # the call's start; the zoo's models keep no running statistics (GroupNorm only), so none go stale.
        ahead = GradSampleModule(copy.deepcopy(model)) if lookahead is not None else None
        ghost = ghost_clipping_applies(model, batch_loss, lookahead)
        dp_kwargs = dict(noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                         expected_batch_size=max(1, round(expected_batch)), loss_reduction="mean")
        gsm: GradSampleModule
        dp_opt: DPOptimizer
        if ghost:
            gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=self.max_grad_norm, loss_reduction="mean")
            dp_opt = _SecureGhostDPOptimizer(optimizer, rng=noise, **dp_kwargs)  # type: ignore[arg-type]
        else:
            gsm = GradSampleModule(model)
            dp_opt = _SecureDPOptimizer(optimizer, rng=noise, **dp_kwargs)  # type: ignore[arg-type]
        model.train()
        if ahead is not None:
            ahead.train()
        total, seen, done = 0.0, 0, 0
        try:
            for _ in range(total_steps):
                idx = sampling.poisson_sample(n, sample_rate=sample_rate)
                dp_opt.zero_grad(set_to_none=True)
                if len(idx) == 0:
                    self._noise_only_step(dp_opt, noise, expected_batch, gsm, model, public_loss, combine)
                else:
                    if ghost:
                        assert isinstance(gsm, GradSampleModuleFastGradientClipping)
                        loss = self._ghost_backward(gsm, dp_opt, x[idx], y[idx])
                    else:
                        loss = batch_loss(gsm, x[idx], y[idx])
                        with _quiet_hooks():
                            loss.backward()
                    public_grads = None
                    if lookahead is not None:
                        assert ahead is not None and public_loss is not None
                        public_grads = self._public_gradient(gsm, model, public_loss)
                        loss = lookahead.mix(loss.detach(), self._add_look_ahead_gradients(
                            ahead, model, lookahead, public_grads, batch_loss, x[idx], y[idx]))
                    if dp_opt.pre_step():  # clip per example, sum, add noise, scale: p.grad is now private
                        self._add_public_gradient(gsm, model, public_loss, combine, public_grads)
                        dp_opt.original_optimizer.step()
                    total += float(loss.detach()) * len(idx)
                    seen += len(idx)
                done += 1
        finally:
            dp_opt.zero_grad(set_to_none=True)
            # Remove the per-sample hooks so public steps and evaluation run on the bare model.
            gsm._close()
            if ahead is not None:
                ahead._close()
        return TrainStats(done, seen, total / max(seen, 1))

    def fit_public(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                   batch_size: int, epochs: int, batch_loss: BatchLoss = cross_entropy_loss,
                   payload: str = "public_training") -> TrainStats:
        """Train on public data: no noise, no cost, and the ledger says so explicitly."""
        self.commit(PublicDataEvent(payload=payload, unit="record",
                                    reason="trained on public inputs and released aggregates only"))
        return fit_public(model, optimizer, x, y, batch_size=batch_size, epochs=epochs, batch_loss=batch_loss)

    def _noise_only_step(self, dp_opt: DPOptimizer, rng: SecureRandom, expected_batch: float, gsm: GradSampleModule,
                         model: nn.Module, public_loss: PublicLoss | None, combine: GradientCombine | None) -> None:
        """An empty Poisson batch: the released update is pure noise, exactly as DPOptimizer would add."""
        params = [p for group in dp_opt.original_optimizer.param_groups for p in group["params"] if p.requires_grad]
        for p, noise in zip(params, _secure_noise(rng, params, self.noise_multiplier * self.max_grad_norm), strict=True):
            p.grad = noise / expected_batch
        self._add_public_gradient(gsm, model, public_loss, combine)
        dp_opt.original_optimizer.step()

    @staticmethod
    def _ghost_backward(gsm: GradSampleModuleFastGradientClipping, dp_opt: DPOptimizer, xb: torch.Tensor,
                        yb: torch.Tensor) -> torch.Tensor:
        """Ghost clipping's two passes (Opacus ``DPTensorFastGradientClipping.backward``): the first only
        gives each record's gradient norm (hooks), the second backpropagates the per-record losses weighted by
        their clipping factors, so ``p.grad`` is the sum of clipped per-record gradients. Returns the mean loss."""
        losses = F.cross_entropy(gsm(xb), yb, reduction="none")
        with _quiet_hooks():
            losses.mean().backward(retain_graph=True)
            dp_opt.zero_grad(set_to_none=True)
            coefficients = gsm.get_clipping_coef()
            gsm.disable_hooks()
            try:
                (coefficients * losses).sum().backward()
            finally:
                gsm.enable_hooks()
        return losses.detach().mean()

    @staticmethod
    def _public_gradient(gsm: GradSampleModule, model: nn.Module,
                         public_loss: PublicLoss) -> list[torch.Tensor | None]:
        """The public term's gradient, with the per-sample hooks off so its forward pass never mixes into the
        per-record gradients."""
        params = trainable_parameters(model)
        gsm.disable_hooks()
        try:
            with _quiet_hooks():
                grads = torch.autograd.grad(public_loss(model), params, allow_unused=True)
        finally:
            gsm.enable_hooks()
        return list(grads)

    @staticmethod
    def _add_look_ahead_gradients(ahead: GradSampleModule, model: nn.Module, lookahead: LookAhead,
                                  public_grads: list[torch.Tensor | None], batch_loss: BatchLoss, xb: torch.Tensor,
                                  yb: torch.Tensor) -> torch.Tensor:
        """Replace each record's gradient at theta by (1 - weight) * it + weight * its gradient at theta', before
        clipping, so that DPOptimizer clips the two as one per-record vector. Returns the loss at theta' (detached)."""
        params = trainable_parameters(model)
        ahead_params = trainable_parameters(ahead._module)
        with torch.no_grad():
            for q, value in zip(ahead_params, lookahead.point(params, flatten_grads(params, public_grads)),
                                strict=True):
                q.copy_(value)
        loss_ahead = batch_loss(ahead, xb, yb)
        with _quiet_hooks():
            loss_ahead.backward()
        for p, q in zip(params, ahead_params, strict=True):
            here, there = p.grad_sample, q.grad_sample  # type: ignore[attr-defined]  # set by Opacus at run time
            if there is None:
                continue
            p.grad_sample = lookahead.weight * there if here is None else lookahead.mix(here, there)  # type: ignore[attr-defined]  # set by Opacus at run time
        ahead.zero_grad(set_to_none=True)
        return loss_ahead.detach()

    def _add_public_gradient(self, gsm: GradSampleModule, model: nn.Module, public_loss: PublicLoss | None,
                             combine: GradientCombine | None, grads: list[torch.Tensor | None] | None = None) -> None:
        """Join the gradient of a public-data term (``grads`` if already taken) to the private one after clipping
        and noise: post-processing, no cost. Summed, or ``combine(g_private, g_public)`` (e.g. a projection)
        when given."""
        if public_loss is None:
            return
        params = trainable_parameters(model)
        if grads is None:
            grads = self._public_gradient(gsm, model, public_loss)
        if combine is not None:
            set_flat_grad(params, combine(flatten_grads(params, [p.grad for p in params]), flatten_grads(params, grads)))
            return
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g.clone() if p.grad is None else p.grad + g
