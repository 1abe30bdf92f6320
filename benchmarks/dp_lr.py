"""DP-SGD learning rates, checked on validation data: why the accuracy benchmark's DP columns use the rates they do.

DP-SGD clips every example's gradient to norm C = 1 before averaging, so the
averaged step is much shorter than without DP, and a learning rate tuned
without DP can leave a model under-trained at any ε. This benchmark trains one
model (``cnn_s``, GroupNorm) with securefl's DP-SGD trainer on 6,000 IID
Fashion-MNIST train images at ε = 8 (δ = 1e-5, σ calibrated by securefl's
accountant for the planned steps), once per optimizer setting, and scores every
epoch on 10,000 *other train images*: a validation set, never the test set.

The optimizer settings are the non-private ones the benchmark's rows use
(Adam 1e-3; FedGen's plain SGD 0.01; FML's and HeteroFL's momentum SGD 0.01)
and the DP rates the accuracy benchmark gives the SGD rows in its DP columns
(plain SGD 0.1, momentum SGD 0.05), plus plain SGD 1.0 as a larger step.

The same check for another model or budget (``--model``, ``--epsilon``, a subset of ``--settings``) asks whether
a rate chosen at ε = 8 on ``cnn_s`` carries over, e.g. to the wide MLP of a participant with ε = 1.

Usage::

    python benchmarks/dp_lr.py             # ~1 minute per setting on one core
    python benchmarks/dp_lr.py --quick     # 2 epochs on 1,000 images (CI smoke)
    python benchmarks/dp_lr.py --epsilon 1 --model mlp_l --settings adam msgd0.01 msgd0.05 \
        --out-name dp_lr_mlp_l_eps1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

# key -> (label, optimizer, lr, momentum)
SETTINGS: dict[str, tuple[str, str, float, float]] = {
    "adam": ("Adam 1e-3 (non-private default)", "adam", 1e-3, 0.0),
    "sgd0.01": ("SGD 0.01 (FedGen, non-private)", "sgd", 0.01, 0.0),
    "sgd0.1": ("SGD 0.1 (FedGen, DP columns)", "sgd", 0.1, 0.0),
    "sgd1": ("SGD 1.0", "sgd", 1.0, 0.0),
    "msgd0.01": ("momentum SGD 0.01 (FML, HeteroFL, non-private)", "sgd", 0.01, 0.9),
    "msgd0.05": ("momentum SGD 0.05 (DP columns: FML, HeteroFL, the Adam rows)", "sgd", 0.05, 0.9),
}


def train_one(label: str, kind: str, lr: float, momentum: float, *, train: tuple[torch.Tensor, torch.Tensor],
              val: tuple[torch.Tensor, torch.Tensor], epsilon: float, epochs: int, batch_size: int,
              seed: int, model_name: str = "cnn_s") -> dict[str, Any]:
    from securefl.models.zoo import build_model
    from securefl.privacy.calibration import calibrate_noise_multiplier
    from securefl.privacy.dp_sgd import DPSGDTrainer
    from securefl.runtime.training import accuracy, make_optimizer

    x, y = train
    steps = epochs * len(x) // batch_size
    sigma = calibrate_noise_multiplier(target_epsilon=epsilon, delta=1e-5, sample_rate=batch_size / len(x),
                                       steps=steps)
    torch.manual_seed(seed)
    model = build_model(model_name, tuple(x.shape[1:]), 10)
    optimizer = make_optimizer(model, kind=kind, lr=lr, momentum=momentum)
    trainer = DPSGDTrainer(noise_multiplier=sigma, max_grad_norm=1.0, commit=lambda event: None)
    curve = []
    for _ in range(epochs):
        trainer.fit(model, optimizer, x, y, batch_size=batch_size, epochs=1)
        curve.append(accuracy(model, *val))
    return {"setting": label, "model": model_name, "optimizer": kind, "lr": lr, "momentum": momentum,
            "epsilon": epsilon, "noise_multiplier": sigma, "val_curve": curve, "val_final": curve[-1]}


def short_label(row: dict[str, Any]) -> str:
    """The plot's legend entry: optimizer and rate only (the table keeps the long label)."""
    kind = "Adam" if row["optimizer"] == "adam" else ("momentum SGD" if row["momentum"] else "SGD")
    return f"{kind} {row['lr']:g}"


def write(rows: list[dict[str, Any]], name: str, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from securefl.report import finish_figure

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [f"Made by `{command}`. {rows[0].get('model', 'cnn_s')}, DP-SGD (C = 1, δ = 1e-5), accuracy on 10,000 "
             "held-out *train* images "
             "(validation; the test set is not used).", "",
             "| optimizer | ε | σ | validation accuracy, last epoch | best epoch |", "|---|---|---|---|---|"]
    for row in rows:
        best = max(range(len(row["val_curve"])), key=lambda i: row["val_curve"][i])
        lines.append(f"| {row['setting']} | {row['epsilon']:g} | {row['noise_multiplier']:.3f} | "
                     f"{100 * row['val_final']:.1f} | {best + 1} ({100 * row['val_curve'][best]:.1f}) |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.plot(range(1, len(row["val_curve"]) + 1), [100 * a for a in row["val_curve"]], marker=".",
                label=short_label(row))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{rows[0].get('model', 'cnn_s')}, DP-SGD at ε = {rows[0]['epsilon']:g}: "
                 "learning rate against validation accuracy")
    finish_figure(fig, ax, RESULTS / f"{name}.png")  # "best": a collapsing curve ends where "lower right" sits


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from securefl.data.datasets import load_fashion_mnist

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--records", type=int, default=6000, help="IID training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 epochs on 1,000 images")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="cnn_s", help="a model of the zoo (default cnn_s)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="optimizer settings to train (default: all)")
    parser.add_argument("--out-name", default=None,
                        help="results file name (default dp_lr, or dp_lr_quick with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.records = 2, 1000
    if args.epsilon <= 0 or args.epochs < 1 or args.records < 64:
        parser.error("--epsilon must be > 0, --epochs >= 1 and --records >= 64")
    from securefl.models.zoo import MODEL_ZOO

    if args.model not in MODEL_ZOO:
        parser.error(f"--model {args.model!r}: not in the zoo ({', '.join(MODEL_ZOO)})")
    torch.set_num_threads(1)
    data = load_fashion_mnist(args.data_dir)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(args.seed))
    train_idx, val_idx = order[:args.records], order[args.records:args.records + 10_000]
    train, val = (data.x_train[train_idx], data.y_train[train_idx]), (data.x_train[val_idx], data.y_train[val_idx])
    command = "python benchmarks/dp_lr.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for key in tqdm(args.settings, desc="DP-SGD learning rates", unit="setting"):
        label, kind, lr, momentum = SETTINGS[key]
        rows.append(train_one(label, kind, lr, momentum, train=train, val=val, epsilon=args.epsilon,
                              epochs=args.epochs, batch_size=64, seed=args.seed, model_name=args.model))
    name = args.out_name or ("dp_lr_quick" if args.quick else "dp_lr")
    write(rows, name, command.strip())
    print((RESULTS / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
