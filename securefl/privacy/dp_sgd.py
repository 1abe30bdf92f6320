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
  expected batch size;
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
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from securefl.privacy.events import AnyEvent, PrivacyEvent, PublicDataEvent
from securefl.privacy.randomness import SecureRandom
from securefl.runtime.training import (
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

Commit = Callable[[AnyEvent], None]


@contextlib.contextmanager
def _quiet_hooks() -> Iterator[None]:
    """Opacus's backward hooks make torch warn on every backward of a model whose inputs need no gradient."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


class _SecureDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer, its Gaussian noise drawn from a :class:`SecureRandom` instead of torch's RNG."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: SecureRandom, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)  # type: ignore[arg-type]
        self._rng = rng

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self._rng.normal(p.summed_grad.shape, std=std, dtype=p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise.to(p.summed_grad.device)).view_as(p)
            _mark_as_processed(p.summed_grad)


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
        gsm = GradSampleModule(model)
        dp_opt = _SecureDPOptimizer(optimizer, rng=noise, noise_multiplier=self.noise_multiplier,
                                    max_grad_norm=self.max_grad_norm,
                                    expected_batch_size=max(1, round(expected_batch)), loss_reduction="mean")
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
                    loss = batch_loss(gsm, x[idx], y[idx])
                    with _quiet_hooks():
                        loss.backward()
                    public_grads = None
                    if lookahead is not None:
                        assert ahead is not None and public_loss is not None
                        public_grads = self._public_gradient(gsm, model, public_loss)
                        loss = loss.detach() + lookahead.weight * self._add_look_ahead_gradients(
                            ahead, model, lookahead, public_grads, batch_loss, x[idx], y[idx])
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
        std = self.noise_multiplier * self.max_grad_norm
        for group in dp_opt.original_optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.grad = rng.normal(p.shape, std=std, dtype=p.dtype).to(p.device) / expected_batch
        self._add_public_gradient(gsm, model, public_loss, combine)
        dp_opt.original_optimizer.step()

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
        """Add weight * (each record's gradient at theta') to its gradient at theta, before clipping, so that
        DPOptimizer clips the two as one per-record vector. Returns the loss at theta' (detached)."""
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
            here, there = p.grad_sample, q.grad_sample
            if there is None:
                continue
            p.grad_sample = lookahead.weight * there if here is None else here + lookahead.weight * there
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
