"""Training loops shared by every protocol, and the injected ``Trainer``.

Protocols never build their own loop over private data: they call
``party.trainer.fit(...)`` with a per-batch loss. The plain trainer below is the
default; the privacy layer injects a DP-SGD trainer with the same signature, so
switching DP on changes no protocol file. Steps on *public* data (FedMD's
digest, transfer learning on a public set) use :func:`fit_public`, which is
always plain because public data needs no protection.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# A term computed on public or synthetic inputs only (FedH2L's seed-set distillation, FedGen's
# generated features). It is passed separately because DP-SGD must clip and noise only the
# per-record private gradient; the public term's gradient is added afterwards at no privacy cost.
PublicLoss = Callable[[nn.Module], torch.Tensor]
# How one step joins the private gradient with the public term's: (g_private, g_public) -> direction, both flat
# over the trainable parameters. None means their sum. Under DP-SGD g_private arrives already clipped and noised,
# so whatever the combination does with it is post-processing (FedH2L's PCGrad projects g_public off it).
GradientCombine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LookAhead:
    """A first-order meta step along the public term (MLDG: Li, Yang, Song & Hospedales 2018).

    The look-ahead point is theta' = theta - step * grad public(theta), and each private record's loss is split
    between the two points: (1 - weight) * loss(theta) + weight * loss(theta'), the gradient at theta' applied at
    theta (first order: the Jacobian of theta' is dropped). The private loss so keeps total weight 1 (MLDG's
    meta-train / meta-test split of it). FedH2L's ``meta`` alignment is this with the seed-set distillation as
    the public term.

    theta' depends on the model and public data only, so each record still contributes one gradient vector,
    (1 - weight) * grad loss(theta) + weight * grad loss(theta'). DP-SGD clips that vector as a whole: one record
    moves the released sum by at most C, exactly as without the look-ahead, and the step costs the same.
    """

    step: float
    weight: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"LookAhead weight must be in [0, 1] (the share of the private loss taken at theta'); "
                             f"got {self.weight}")

    def mix(self, here: torch.Tensor, there: torch.Tensor) -> torch.Tensor:
        """(1 - weight) * here + weight * there: a record's gradient (or loss) at theta and at theta'."""
        return (1.0 - self.weight) * here + self.weight * there

    def point(self, params: Sequence[torch.Tensor], g_public: torch.Tensor) -> list[torch.Tensor]:
        """theta', one detached tensor per parameter."""
        chunks = torch.split(g_public.detach(), [p.numel() for p in params])
        return [p.detach() - self.step * g.view_as(p) for p, g in zip(params, chunks, strict=True)]


class AtParameters(nn.Module):
    """``model`` evaluated at other values of its trainable parameters (its buffers and frozen parameters as
    they are), for a loss at a look-ahead point; gradients flow to ``values``."""

    def __init__(self, model: nn.Module, values: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self._model = (model,)  # a tuple, so the model is not registered as a submodule of this view
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.values = list(values)
        self._by_name = dict(zip(names, self.values, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._model[0], self._by_name, (x,))


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) with the spec's exact form: batchmean over log_softmax / softmax."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits.detach() / temperature, dim=1),
        reduction="batchmean",
    )


def minibatches(n: int, batch_size: int, *, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index batches over ``n`` records; shuffling draws from torch's (runtime-seeded) global RNG."""
    order = torch.randperm(n) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@dataclass(frozen=True)
class TrainStats:
    steps: int
    samples: int
    mean_loss: float


@runtime_checkable
class Trainer(Protocol):
    """How a protocol trains on private data: :class:`PlainTrainer`, or the DP-SGD trainer the privacy layer
    injects (``securefl.privacy.dp_sgd.DPSGDTrainer``) with the same signature."""

    name: str

    def validation(self, score: Callable[[], float]) -> Callable[[], float] | None: ...

    def fit(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
            batch_size: int, epochs: int | None = None, steps: int | None = None,
            batch_loss: BatchLoss = ..., max_grad_norm: float | None = None,
            payload: str = "private_training", public_loss: PublicLoss | None = None,
            combine: GradientCombine | None = None, lookahead: LookAhead | None = None) -> TrainStats: ...

    def fit_public(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                   batch_size: int, epochs: int, batch_loss: BatchLoss = ...,
                   payload: str = "public_training") -> TrainStats: ...

    def label_histogram(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor: ...


class PlainTrainer:
    """Non-private minibatch training over a participant's private data."""

    name = "plain"

    def validation(self, score: Callable[[], float]) -> Callable[[], float] | None:
        """The validation score a protocol may select epochs or weights with: without DP, the given one."""
        return score

    def fit(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
            batch_size: int, epochs: int | None = None, steps: int | None = None,
            batch_loss: BatchLoss = cross_entropy_loss, max_grad_norm: float | None = None,
            payload: str = "private_training", public_loss: PublicLoss | None = None,
            combine: GradientCombine | None = None, lookahead: LookAhead | None = None) -> TrainStats:
        """Train for ``epochs`` passes or exactly ``steps`` minibatches (FedGen counts steps).

        Each step minimises ``batch_loss`` on a private minibatch plus ``public_loss`` (if given); with
        ``combine``, the step follows ``combine(g_private, g_public)`` instead of their sum; with
        ``lookahead``, the private gradient gains the look-ahead term (see :class:`LookAhead`).

        ``payload`` names the step for the privacy ledger of a DP trainer; the
        plain trainer records nothing.
        """
        return _run_minibatches(model, optimizer, x, y, batch_size=batch_size, epochs=epochs, steps=steps,
                                batch_loss=batch_loss, max_grad_norm=max_grad_norm, public_loss=public_loss,
                                combine=combine, lookahead=lookahead)

    def fit_public(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                   batch_size: int, epochs: int, batch_loss: BatchLoss = cross_entropy_loss,
                   payload: str = "public_training") -> TrainStats:
        """Train on public data. A DP trainer logs it as a zero-cost step; this one just trains."""
        return fit_public(model, optimizer, x, y, batch_size=batch_size, epochs=epochs, batch_loss=batch_loss)

    def label_histogram(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The participant's label counts as it may share them: here, exactly (a DP trainer adds noise)."""
        return torch.bincount(labels, minlength=num_classes).float()


def fit_public(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               batch_size: int, epochs: int, batch_loss: BatchLoss = cross_entropy_loss) -> TrainStats:
    """Train on public data (no privacy cost, hence always the plain loop)."""
    return _run_minibatches(model, optimizer, x, y, batch_size=batch_size, epochs=epochs, steps=None,
                            batch_loss=batch_loss, max_grad_norm=None)


def _run_minibatches(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                     batch_size: int, epochs: int | None, steps: int | None, batch_loss: BatchLoss,
                     max_grad_norm: float | None, public_loss: PublicLoss | None = None,
                     combine: GradientCombine | None = None, lookahead: LookAhead | None = None) -> TrainStats:
    check_fit_arguments(epochs=epochs, steps=steps, public_loss=public_loss, combine=combine, lookahead=lookahead)
    n = len(x)
    if n == 0:
        return TrainStats(0, 0, float("nan"))
    model.train()
    total, done, seen = 0.0, 0, 0

    def batch_stream() -> Iterator[torch.Tensor]:
        if epochs is not None:
            for _ in range(epochs):
                yield from minibatches(n, batch_size)
        else:
            # Steps, not epochs: cycle over fresh shuffles; a silo smaller than a batch still works.
            while True:
                yield from minibatches(n, batch_size)

    for idx in batch_stream():
        if steps is not None and done >= steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss = backward_step(model, x[idx], y[idx], batch_loss=batch_loss, public_loss=public_loss,
                             combine=combine, lookahead=lookahead)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        total += float(loss) * len(idx)
        seen += len(idx)
        done += 1
    return TrainStats(done, seen, total / max(seen, 1))


def backward_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, *, batch_loss: BatchLoss,
                  public_loss: PublicLoss | None = None, combine: GradientCombine | None = None,
                  lookahead: LookAhead | None = None) -> torch.Tensor:
    """Write one non-private step's direction into the parameters' ``.grad``; returns the step's loss (detached).

    The direction is g_private + g_public, or ``combine(g_private, g_public)``; with ``lookahead``, g_private
    becomes (1 - weight) * grad batch_loss(theta) + weight * grad batch_loss(theta'), theta' taken along g_public.
    """
    loss = batch_loss(model, xb, yb)
    if public_loss is None:
        loss.backward()
        return loss.detach()
    if combine is None and lookahead is None:
        loss = loss + public_loss(model)
        loss.backward()
        return loss.detach()
    public = public_loss(model)
    params = trainable_parameters(model)
    g_private, g_public = flat_grad(loss, params), flat_grad(public, params)
    total = loss.detach() + public.detach()
    if lookahead is None:
        set_flat_grad(params, g_private + g_public if combine is None else combine(g_private, g_public))
        return total
    ahead = AtParameters(model, [p.requires_grad_() for p in lookahead.point(params, g_public)])
    loss_ahead = batch_loss(ahead, xb, yb)
    g_mixed = lookahead.mix(g_private, flat_grad(loss_ahead, ahead.values))
    set_flat_grad(params, g_mixed + g_public if combine is None else combine(g_mixed, g_public))
    return lookahead.mix(loss.detach(), loss_ahead.detach()) + public.detach()


def check_fit_arguments(*, epochs: int | None, steps: int | None, public_loss: PublicLoss | None,
                        combine: GradientCombine | None, lookahead: LookAhead | None = None) -> None:
    """The argument rules every trainer's ``fit`` shares."""
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    if combine is not None and public_loss is None:
        raise ValueError("combine joins the private gradient with a public term's: give public_loss too")
    if lookahead is not None and public_loss is None:
        raise ValueError("lookahead steps along the public term's gradient: give public_loss too")


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """d loss / d params as one vector; a parameter the loss does not reach gets zeros."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return flatten_grads(params, grads)


def flatten_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)])


@torch.no_grad()
def set_flat_grad(params: Sequence[torch.Tensor], direction: torch.Tensor) -> None:
    """Write one flat vector into the parameters' ``.grad``, for the optimizer's next step."""
    for p, chunk in zip(params, torch.split(direction, [p.numel() for p in params]), strict=True):
        p.grad = chunk.view_as(p).clone()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    outs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, classes: torch.Tensor | None = None) -> float:
    """Top-1 accuracy; with ``classes`` the argmax is taken over those output units only."""
    if len(x) == 0:
        return float("nan")
    return argmax_accuracy(predict_logits(model, x), y, classes)


def argmax_accuracy(logits: torch.Tensor, y: torch.Tensor, classes: torch.Tensor | None = None) -> float:
    """Top-1 accuracy of given logits; with ``classes`` the argmax is over those output units only."""
    if len(y) == 0:
        return float("nan")
    pred = classes[logits[:, classes].argmax(dim=1)] if classes is not None else logits.argmax(dim=1)
    return float((pred == y).float().mean())


@torch.no_grad()
def own_distribution_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_counts: torch.Tensor, *,
                              classes: torch.Tensor | None = None) -> float:
    """Test accuracy reweighted to an owner's label distribution: Σ_c π_c · acc_c.

    acc_c is the per-class accuracy on the (balanced) test set and π_c the class's share of the
    owner's training records; classes with no test record are dropped and π renormalised.
    """
    if len(x) == 0:
        return float("nan")
    return own_distribution_from_logits(predict_logits(model, x), y, label_counts, classes)


def own_distribution_from_logits(logits: torch.Tensor, y: torch.Tensor, label_counts: torch.Tensor,
                                 classes: torch.Tensor | None = None) -> float:
    """:func:`own_distribution_accuracy` of given logits."""
    if len(y) == 0:
        return float("nan")
    pred = classes[logits[:, classes].argmax(dim=1)] if classes is not None else logits.argmax(dim=1)
    num_classes = len(label_counts)
    correct = torch.bincount(y[pred == y], minlength=num_classes).float()
    seen = torch.bincount(y, minlength=num_classes).float()
    weights = torch.where(seen > 0, label_counts.float(), torch.zeros(num_classes))
    if float(weights.sum()) <= 0:
        return float("nan")
    per_class = torch.where(seen > 0, correct / seen.clamp_min(1), torch.zeros(num_classes))
    return float((weights * per_class).sum() / weights.sum())


def fit_with_early_stopping(fit_epoch: Callable[[], object], model: nn.Module,
                            validate: Callable[[], float] | None, *, max_epochs: int,
                            patience: int) -> tuple[int, float]:
    """Run ``fit_epoch`` until the validation score stops improving; restore the best weights.

    ``validate`` returns a score where higher is better. Selection uses the
    validation split only (the FedMD reference code selects on the test set;
    we never do). ``validate=None`` (what a trainer's :meth:`validation` gives
    when selecting would leak private records): run ``max_epochs`` and keep the
    last weights. Returns (epochs run, best validation score, NaN without one).
    """
    if validate is None:
        for _ in range(max_epochs):
            fit_epoch()
        return max_epochs, float("nan")
    best_acc, best_state, since_best, epochs = -float("inf"), None, 0, 0
    for _ in range(max_epochs):
        fit_epoch()
        epochs += 1
        acc = validate()
        if acc > best_acc:
            best_acc, best_state, since_best = acc, copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return epochs, best_acc


def make_optimizer(model: nn.Module, *, kind: str, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; allowed: adam, sgd")
