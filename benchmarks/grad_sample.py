"""Opacus's grad-sample modes on the A1 zoo: the time of one DP-SGD step against a plain step, and agreement.

For every zoo model of setting A1 (Fashion-MNIST-shaped input 1x28x28, batch 64, torch on one thread), one
step = forward, backward, per-example clipping, noise, optimizer step, in each mode:

- ``plain``: no DP (the reference time);
- ``hooks``: Opacus ``GradSampleModule`` (per-layer einsum hooks);
- ``functorch``: ``GradSampleModule(force_functorch=True)`` (``torch.func.vmap(grad)`` per layer);
- ``ew``: ``GradSampleModuleExpandedWeights`` (torch's ExpandedWeights);
- ``ghost``: ghost clipping (``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` +
  ``DPLossFastGradientClipping``): two backward passes, per-example norms without per-example gradients for
  ``Linear`` layers (the others fall back to per-example gradients, then their norms).

Noise comes from :class:`~securefl.privacy.randomness.SecureRandom` in every DP mode, as in our trainer, so the
ratios isolate the grad-sample mode. Agreement: with noise off (σ = 0), the clipped, summed, scaled gradient
(``p.grad`` after ``pre_step``) and the per-example norms of each mode against ``hooks`` (max abs difference;
relative to the largest entry in brackets).

Usage::

    python benchmarks/grad_sample.py              # ~3 minutes on one core
    python benchmarks/grad_sample.py --repeats 5  # quicker

Writes ``benchmarks/results/grad_sample.json`` and ``benchmarks/results/grad_sample.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from opacus.grad_sample import GradSampleModule, GradSampleModuleExpandedWeights  # noqa: E402
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (  # noqa: E402
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import DPOptimizerFastGradientClipping  # noqa: E402
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping  # noqa: E402

from securefl.core.training import cross_entropy_loss  # noqa: E402
from securefl.models.zoo import build_model  # noqa: E402
from securefl.privacy.dp_sgd import _SecureDPOptimizer, ghost_clipping_applies  # noqa: E402
from securefl.privacy.randomness import SecureRandom  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("cnn_s", "mlp_m", "resnet_s", "mlp_l", "deepcnn_s", "mlp_s")
MODES = ("hooks", "functorch", "ew", "ghost")
BATCH, CLIP = 64, 1.0


class _SecureGhostOptimizer(DPOptimizerFastGradientClipping):
    """Ghost clipping's optimizer with the noise of our trainer (SecureRandom), so only the mode differs."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: SecureRandom, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)  # type: ignore[arg-type]
        self._rng = rng

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self._rng.normal(p.summed_grad.shape, std=std, dtype=p.summed_grad.dtype)
                      ).view_as(p)
            _mark_as_processed(p.summed_grad)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, (1, 28, 28), 10)


def make_step(mode: str, name: str, sigma: float) -> tuple[Callable[[torch.Tensor, torch.Tensor], None],
                                                          torch.nn.Module, Callable[[], torch.Tensor | None]]:
    """A closure doing one step of ``mode`` on a fresh ``name``; the model; and a getter of per-example norms."""
    model = _model(name)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every repeat times the same weights
    if mode == "plain":
        def plain(x: torch.Tensor, y: torch.Tensor) -> None:
            sgd.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            sgd.step()
        return plain, model, lambda: None
    opt_kwargs = dict(noise_multiplier=sigma, max_grad_norm=CLIP, expected_batch_size=BATCH, loss_reduction="mean")
    if mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=CLIP, use_ghost_clipping=True)
        opt = _SecureGhostOptimizer(sgd, rng=SecureRandom(), **opt_kwargs)
        criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(), loss_reduction="mean")

        def ghost(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            criterion(gsm(x), y).backward()
            opt.step()
        return ghost, model, lambda: gsm.per_sample_gradient_norms
    if mode == "hooks":
        gsm = GradSampleModule(model)
    elif mode == "functorch":
        gsm = GradSampleModule(model, force_functorch=True)
    elif mode == "ew":
        gsm = GradSampleModuleExpandedWeights(model)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    opt = _SecureDPOptimizer(sgd, rng=SecureRandom(), **opt_kwargs)

    def dp(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y).backward()
        opt.step()

    def norms() -> torch.Tensor:
        return torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in opt.grad_samples], dim=1).norm(2, dim=1)
    # Norms must be read before zero_grad: ``step`` keeps grad_sample until the next zero_grad.
    return dp, model, norms


def clipped_gradient(mode: str, name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped, summed, scaled gradient of one step with σ = 0 (``p.grad`` before the update), and norms."""
    step, model, norms = make_step(mode, name, sigma=0.0)
    step(x, y)  # lr 0: the update changes nothing, p.grad stays what pre_step made
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return grad, norms()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, 1, 28, 28, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def measure(repeats: int) -> list[dict[str, object]]:
    x, y = batch()
    rows = []
    for name in MODELS:
        ref_grad, ref_norms = clipped_gradient("hooks", name, x, y)
        steps = {}
        row: dict[str, object] = {"model": name, "params": sum(p.numel() for p in _model(name).parameters()),
                                  "adopted": "ghost" if ghost_clipping_applies(_model(name), cross_entropy_loss, None)
                                  else "hooks"}
        for mode in ("plain", *MODES):
            try:
                steps[mode] = make_step(mode, name, sigma=1.0)[0]
                steps[mode](x, y)  # warm-up (and a check that the mode runs at all)
                if mode != "plain":
                    grad, norms = clipped_gradient(mode, name, x, y)
                    row[f"{mode}_grad_diff"] = float((grad - ref_grad).abs().max())
                    row[f"{mode}_grad_rel"] = float((grad - ref_grad).abs().max() / ref_grad.abs().max())
                    row[f"{mode}_norm_diff"] = float((norms - ref_norms).abs().max())
            except Exception as exc:  # a mode that cannot run this model is reported, not fatal
                row[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:200]
                steps.pop(mode, None)
        times: dict[str, list[float]] = {m: [] for m in steps}
        for rep in range(repeats):
            order = list(steps) if rep % 2 == 0 else list(reversed(steps))  # alternate against drifting load
            for mode in order:
                start = time.perf_counter()
                steps[mode](x, y)
                times[mode].append(time.perf_counter() - start)
        for mode, ts in times.items():
            row[f"{mode}_ms"] = 1000 * statistics.median(ts)
        for mode in MODES:
            if mode in times:
                row[f"{mode}_vs_plain"] = row[f"{mode}_ms"] / row["plain_ms"]  # type: ignore[operator]
                row[f"{mode}_vs_hooks"] = row[f"{mode}_ms"] / row["hooks_ms"]  # type: ignore[operator]
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{m} {row[f'{m}_ms']:.1f} ms" for m in times), file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, object]], command: str, repeats: int) -> str:
    def num(v: object, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "# Opacus grad-sample modes on the A1 zoo (one DP-SGD step)",
        "",
        f"Made by `{command}` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{platform.machine()}, torch {torch.__version__} on 1 thread, Python {platform.python_version()}. "
        f"Input 1x28x28, batch {BATCH}; a step is forward, backward, per-example clip, SecureRandom noise, SGD step; "
        f"median of {repeats} alternated repeats; load average {os.getloadavg()[0]:.1f} at the end (2 cores shared: "
        "absolute times move with the load, the alternated ratios less).",
        "",
        "`adopted`: the mode `DPSGDTrainer` uses for this model with the plain cross-entropy and no look-ahead "
        "(`ghost_clipping_applies`); any other call uses hooks. Time per step (ms) and ratio to a plain step:",
        "",
        "| model | params | adopted | plain ms | " + " | ".join(f"{m} ms (x plain)" for m in MODES) + " |",
        "|---|---:|---|---:|" + "---:|" * len(MODES),
    ]
    for r in rows:
        cells = [f"{r[f'{m}_ms']:.1f} ({r[f'{m}_vs_plain']:.2f}x)" if f"{m}_ms" in r else "fails" for m in MODES]
        lines.append(f"| {r['model']} | {r['params']:,} | {r['adopted']} | {r['plain_ms']:.1f} | "
                     + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratio to hooks, and agreement with hooks at σ = 0: max abs difference of the clipped, summed, scaled "
        "gradient (relative to its largest entry) / of the per-example norms:",
        "",
        "| model | " + " | ".join(f"{m}" for m in MODES[1:]) + " |",
        "|---|" + "---|" * (len(MODES) - 1),
    ]
    for r in rows:
        cells = []
        for m in MODES[1:]:
            if f"{m}_ms" not in r:
                cells.append(f"fails: {r.get(f'{m}_error', '')}".replace("|", "/"))
                continue
            cells.append(f"{r[f'{m}_vs_hooks']:.2f}x; grad {num(r.get(f'{m}_grad_diff'), '.1e')} "
                         f"({num(r.get(f'{m}_grad_rel'), '.1e')}); norms {num(r.get(f'{m}_norm_diff'), '.1e')}")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per mode and model (median)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's full-backward-hook and secure-mode warnings, every step
        rows = measure(args.repeats)
    command = "python benchmarks/grad_sample.py" + (f" --repeats {args.repeats}" if args.repeats != 15 else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grad_sample.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, command, args.repeats)
    (args.out / "grad_sample.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
