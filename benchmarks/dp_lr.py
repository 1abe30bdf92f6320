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

Given several models or budgets it is a grid: every (model, ε, setting) is trained, the results file is
rewritten after each one (a stopped grid keeps what it measured, and a rerun reuses every finished cell whose
set-up matches), and the table names each (model, ε)'s best setting by last-epoch validation accuracy. The
accuracy benchmark's per-model DP rates (``DP_RATES`` in ``accuracy.py``) are read off that table.

Usage::

    python benchmarks/dp_lr.py             # ~1 minute per setting on one core
    python benchmarks/dp_lr.py --quick     # 2 epochs on 1,000 images (CI smoke)
    python benchmarks/dp_lr.py --epsilon 1 --model mlp_l --settings adam msgd0.01 msgd0.05 \
        --out-name dp_lr_mlp_l_eps1
    python benchmarks/dp_lr.py --model cnn_s mlp_m resnet_s mlp_l deepcnn_s mlp_s --epsilon 1 2 4 8 \
        --settings msgd0.01 msgd0.05 --epochs 10 --records 5000 --out-name dp_lr_grid   # the per-model rates
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
    from securefl.core.training import accuracy, make_optimizer
    from securefl.models.zoo import build_model
    from securefl.privacy.calibration import calibrate_noise_multiplier
    from securefl.privacy.dp_sgd import DPSGDTrainer

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
            "epsilon": epsilon, "noise_multiplier": sigma, "val_curve": curve, "val_final": curve[-1],
            "epochs": epochs, "records": len(x), "seed": seed}


def setup_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two trainings the same experiment (rows written before the grid existed lack the last three)."""
    return (row.get("model", "cnn_s"), row["epsilon"], row["optimizer"], row["lr"], row["momentum"],
            row.get("epochs"), row.get("records"), row.get("seed"))


def best_settings(rows: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """(model, ε) -> the row with the highest last-epoch validation accuracy: the run keeps its final model, so the
    final epoch is what a rate has to get right (a rate that peaks and collapses loses)."""
    best: dict[tuple[str, float], dict[str, Any]] = {}
    for row in rows:
        key = (row.get("model", "cnn_s"), row["epsilon"])
        if key not in best or row["val_final"] > best[key]["val_final"]:
            best[key] = row
    return best


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
    tmp = RESULTS / f"{name}.json.tmp"
    tmp.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    tmp.replace(RESULTS / f"{name}.json")
    models = sorted({row.get("model", "cnn_s") for row in rows})
    lines = [f"Made by `{command}`. {', '.join(models)}, DP-SGD (C = 1, δ = 1e-5), accuracy on 10,000 "
             "held-out *train* images "
             "(validation; the test set is not used).", "",
             "| model | optimizer | ε | σ | validation accuracy, last epoch | best epoch |", "|---|---|---|---|---|---|"]
    for row in rows:
        best = max(range(len(row["val_curve"])), key=lambda i: row["val_curve"][i])
        lines.append(f"| {row.get('model', 'cnn_s')} | {row['setting']} | {row['epsilon']:g} | "
                     f"{row['noise_multiplier']:.3f} | {100 * row['val_final']:.1f} | "
                     f"{best + 1} ({100 * row['val_curve'][best]:.1f}) |")
    cases = best_settings(rows)
    if len(cases) > 1:
        lines += ["", "Best setting per model and budget (last-epoch validation accuracy; ties go to the first "
                  "listed):", "", "| model | ε | best | validation accuracy |", "|---|---|---|---|"]
        lines += [f"| {model} | {eps:g} | {short_label(row)} | {100 * row['val_final']:.1f} |"
                  for (model, eps), row in sorted(cases.items())]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    if len(cases) > 1:
        plot_grid(rows, RESULTS / f"{name}.png")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.plot(range(1, len(row["val_curve"]) + 1), [100 * a for a in row["val_curve"]], marker=".",
                label=short_label(row))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{models[0]}, DP-SGD at ε = {rows[0]['epsilon']:g}: "
                 "learning rate against validation accuracy")
    finish_figure(fig, ax, RESULTS / f"{name}.png")  # "best": a collapsing curve ends where "lower right" sits


def plot_grid(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per model: last-epoch validation accuracy against ε, one line per setting."""
    import matplotlib.pyplot as plt

    from securefl.report import finish_figure

    models = list(dict.fromkeys(row.get("model", "cnn_s") for row in rows))
    cols = min(3, len(models))
    lines = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 3.4 * lines), squeeze=False, sharey=True)
    for ax, model in zip(axes.flat, models, strict=False):
        by_setting: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            if row.get("model", "cnn_s") == model:
                by_setting.setdefault(short_label(row), []).append((row["epsilon"], 100 * row["val_final"]))
        for label, points in by_setting.items():
            points.sort()
            ax.plot([e for e, _ in points], [a for _, a in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        budgets = sorted({row["epsilon"] for row in rows})
        ax.set_xticks(budgets, [f"{eps:g}" for eps in budgets])
        ax.set_title(model)
        ax.set_xlabel("ε (record level, δ = 1e-5)")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    fig.suptitle("DP-SGD learning rate per model and budget (last epoch, validation data)")
    finish_figure(fig, axes.flat[0], path)


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from securefl.data.datasets import load_fashion_mnist

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[8.0], help="one or more budgets")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--records", type=int, default=6000, help="IID training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 epochs on 1,000 images")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", nargs="+", default=["cnn_s"], help="one or more models of the zoo")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="optimizer settings to train (default: all)")
    parser.add_argument("--out-name", default=None,
                        help="results file name (default dp_lr, or dp_lr_quick with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.records = 2, 1000
    if min(args.epsilon) <= 0 or args.epochs < 1 or args.records < 64:
        parser.error(f"--epsilon {args.epsilon}, --epochs {args.epochs}, --records {args.records}: need ε > 0, "
                     "epochs >= 1 and records >= 64")
    from securefl.models.zoo import MODEL_ZOO

    for model in args.model:
        if model not in MODEL_ZOO:
            parser.error(f"--model {model!r}: not in the zoo ({', '.join(MODEL_ZOO)})")
    torch.set_num_threads(1)
    data = load_fashion_mnist(args.data_dir)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(args.seed))
    train_idx, val_idx = order[:args.records], order[args.records:args.records + 10_000]
    train, val = (data.x_train[train_idx], data.y_train[train_idx]), (data.x_train[val_idx], data.y_train[val_idx])
    command = ("python benchmarks/dp_lr.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    name = args.out_name or ("dp_lr_quick" if args.quick else "dp_lr")
    previous = RESULTS / f"{name}.json"
    finished = ({setup_key(row): row for row in json.loads(previous.read_text())["rows"]}
                if previous.exists() else {})
    cells = [(model, eps, key) for model in args.model for eps in args.epsilon for key in args.settings]
    rows = []
    for model, eps, key in tqdm(cells, desc="DP-SGD learning rates", unit="training"):
        label, kind, lr, momentum = SETTINGS[key]
        planned = (model, eps, kind, lr, momentum, args.epochs, args.records, args.seed)
        row = finished.get(planned) or train_one(label, kind, lr, momentum, train=train, val=val, epsilon=eps,
                                                 epochs=args.epochs, batch_size=64, seed=args.seed, model_name=model)
        rows.append(row)
        write(rows, name, command)  # after every training: a stopped grid keeps what it measured
    print((RESULTS / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
