"""Empirical privacy audit: a one-run canary membership-inference attack on one participant.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023.
One participant's private data is extended by m canaries (records with a
random wrong label, the easiest to memorise). Each canary is included with
probability 1/2, independently. After training, the attacker scores every
canary by its loss, guesses "included" for the k/2 lowest losses and
"excluded" for the k/2 highest, and counts correct guesses. An (ε, δ)-DP
training run cannot do better (up to δ) than independent guesses that are
right with probability e^ε / (1 + e^ε), so the observed count gives a lower
bound on ε at confidence 1 - β. The bound must stay below what the
accountant reported; if it does not, the accounting or the mechanism is wrong.

The participant trains with securefl's own pieces: the zoo model, the plain
trainer, or the DP-SGD trainer with σ calibrated by the same accountant that
the ledgers report with.

Usage::

    python benchmarks/privacy_audit.py            # no DP, ε = 8 and ε = 2; ~ a few minutes on 2 cores
    python benchmarks/privacy_audit.py --quick    # fewer epochs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from securefl.privacy.empirical import epsilon_lower_bound  # noqa: E402


def run_audit(*, target_epsilon: float | None, canaries: int, epochs: int, seed: int, guesses: int) -> dict:
    from securefl.core.training import PlainTrainer
    from securefl.data.datasets import load_digits
    from securefl.models.zoo import build_model
    from securefl.privacy.calibration import calibrate_noise_multiplier
    from securefl.privacy.dp_sgd import DPSGDTrainer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = load_digits(seed=seed)
    x_all, y_all = data.x_train, data.y_train
    order = rng.permutation(len(x_all))
    canary_idx, base_idx = order[:canaries], order[canaries:]
    # A canary is a record with a wrong label: the model can only fit it by memorising it.
    canary_y = (y_all[canary_idx] + torch.as_tensor(rng.integers(1, 10, canaries))) % 10
    included = rng.random(canaries) < 0.5
    x = torch.cat([x_all[base_idx], x_all[canary_idx][included]])
    y = torch.cat([y_all[base_idx], canary_y[included]])

    model = build_model("mlp_l", data.input_shape, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = 64
    sigma = None
    spent = []
    if target_epsilon is None:
        PlainTrainer().fit(model, optimizer, x, y, batch_size=batch, epochs=epochs)
    else:
        steps = DPSGDTrainer.steps_for(len(x), batch_size=batch, epochs=epochs)
        sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=1e-5, sample_rate=batch / len(x),
                                           steps=steps)
        trainer = DPSGDTrainer(noise_multiplier=sigma, max_grad_norm=1.0, commit=spent.append)
        trainer.fit(model, optimizer, x, y, batch_size=batch, epochs=epochs)
    reported = None
    if spent:
        from securefl.privacy.accountants import get_accountant

        reported = get_accountant("rdp").epsilon(spent, delta=1e-5)

    model.eval()
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(x_all[canary_idx]), canary_y, reduction="none").numpy()
    scores = -losses
    ranked = np.argsort(-scores)
    half = guesses // 2
    guess_in, guess_out = ranked[:half], ranked[-half:]
    correct = int(included[guess_in].sum() + (~included[guess_out]).sum())
    return {
        "target_epsilon": target_epsilon, "reported_epsilon": reported, "noise_multiplier": sigma,
        "canaries": canaries, "guesses": 2 * half, "correct": correct,
        "epsilon_lower_bound": epsilon_lower_bound(correct, 2 * half),
        "scores": scores.tolist(), "included": included.tolist(),
    }


def plot_roc(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5.2, 5))
    for res in results:
        fpr, tpr, _ = roc_curve(res["included"], res["scores"])
        auc = roc_auc_score(res["included"], res["scores"])
        label = "no DP" if res["target_epsilon"] is None else f"DP-SGD, ε = {res['target_epsilon']:g}"
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Canary membership inference (loss attack)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--canaries", type=int, default=500)
    parser.add_argument("--guesses", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs = 10 if args.quick else 40
    results = []
    from tqdm.auto import tqdm

    for target in tqdm([None, 8.0, 2.0], desc="privacy audit", unit="run"):
        results.append(run_audit(target_epsilon=target, canaries=args.canaries, epochs=epochs, seed=args.seed,
                                 guesses=args.guesses))
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in r.items() if k not in ("scores", "included")} for r in results]
    for row in rows:
        row["bound_holds"] = row["reported_epsilon"] is None or row["epsilon_lower_bound"] <= row["reported_epsilon"]
    (RESULTS / "privacy_audit.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_roc(results, RESULTS / "privacy_audit_roc.png")
    command = "python benchmarks/privacy_audit.py" + (" --quick" if args.quick else "")
    lines = [f"Made by `{command}`: one digits participant, {args.canaries} mislabelled canaries each included "
             f"with probability 1/2, {epochs} epochs, loss attack with {args.guesses} guesses, 95% confidence.", "",
             "| training | ε reported (RDP, δ=1e-5) | correct / guesses | empirical ε lower bound | bound ≤ reported |",
             "|---|---|---|---|---|"]
    for row in rows:
        name = "no DP" if row["target_epsilon"] is None else f"DP-SGD, target ε = {row['target_epsilon']:g}"
        reported = "∞" if row["reported_epsilon"] is None else f"{row['reported_epsilon']:.3f}"
        lines.append(f"| {name} | {reported} | {row['correct']} / {row['guesses']} | "
                     f"{row['epsilon_lower_bound']:.3f} | {'yes' if row['bound_holds'] else '**NO**'} |")
    lines += ["", "![ROC](privacy_audit_roc.png)", ""]
    (RESULTS / "privacy_audit.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r["bound_holds"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
