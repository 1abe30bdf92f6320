"""What a run leaves behind for people: ``summary.json``, ``report.md`` and plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from securefl.config import ExperimentConfig
from securefl.core.party import Party
from securefl.protocols import Protocol
from securefl.runtime.privacy import ledger_path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(run_dir: Path, config: ExperimentConfig, parties: Sequence[Party], protocol: Protocol, *,
                 facts: Mapping[str, Mapping[str, Any]] | None = None,
                 stopped: dict[str, str] | None = None) -> dict[str, Any]:
    """``facts``: what each participant's host reports about it (train records, which it withholds under DP;
    with DP its ε, δ, target, unit, ...): in a deployment only the owner's node knows them. The record
    counts come only from there, never from this process's own view of the data."""
    metrics = read_metrics(run_dir)
    final = metrics[-1]
    stopped = stopped or {}
    participants = [
        {"id": p.id, "model": p.model_name, **({"lr": p.lr} if p.lr is not None else {}),
         "final_accuracy": final["participants"][p.id]["accuracy"],
         **{k: v for k, v in final["participants"][p.id].items() if k != "accuracy"},
         "stopped_early": p.id in stopped,
         **({"stopped_reason": stopped[p.id]} if p.id in stopped else {}),
         **(facts or {}).get(p.id, {})}
        for p in parties
    ]
    accs = [p["final_accuracy"] for p in participants]
    summary = {
        "protocol": config.protocol,
        "rounds": config.run.rounds,
        "seed": config.run.seed,
        "dataset": config.data.dataset,
        "mean_accuracy": float(np.mean(accs)),
        "min_accuracy": float(np.min(accs)),
        "max_accuracy": float(np.max(accs)),
        "server": final.get("server", {}),
        "privacy_unit": config.privacy.unit,
        "secure_aggregation": config.secure_aggregation,
        "notes": {**protocol.run_notes(), **warm_start_note(config, protocol)},
        "participants": participants,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_accuracy(metrics, run_dir / "accuracy.png", title=f"{config.protocol} on {config.data.dataset}")
    privacy = {p["id"]: p for p in participants if "epsilon" in p}
    ledgers = {pid: ledger_path(run_dir, pid) for pid in privacy}
    if privacy and all(path.exists() for path in ledgers.values()):
        # In a deployment the ledgers are on the nodes; each node plots its own.
        plot_privacy(privacy, ledgers, run_dir / "privacy.png")
    (run_dir / "report.md").write_text(_markdown(summary, protocol, metrics))
    if privacy:
        (run_dir / "participants").mkdir(exist_ok=True)
        for row in participants:
            (run_dir / "participants" / f"{row['id']}.md").write_text(
                participant_report(row, summary, ledger=f"{run_dir}/ledgers/{row['id']}.jsonl", audit_dir=run_dir))
    return summary


def model_label(participant: Mapping[str, Any]) -> str:
    """A participant's model, and its own learning rate when it trained at one (not the protocol's)."""
    return participant["model"] + (f" (own lr {participant['lr']:g})" if "lr" in participant else "")


def train_records(participant: Mapping[str, Any]) -> str:
    """A participant's record count as the report shows it; its host withholds it under DP."""
    return str(participant["train_records"]) if "train_records" in participant else "withheld (DP)"


def participant_report(row: Mapping[str, Any], run: Mapping[str, Any], *, ledger: str, audit_dir: Path | str) -> str:
    """One data owner's page: what its data bought, what it spent, what bound it, and how to check."""
    lines = [
        f"# {row['id']}: privacy and accuracy report",
        "",
        f"- Run: {run['protocol']} on {run['dataset']}, {run['rounds']} rounds, seed {run['seed']}; "
        f"secure aggregation: {run['secure_aggregation']}",
        f"- Model: {model_label(row)}; training records: {train_records(row)}",
        f"- Final test accuracy: **{row['final_accuracy']:.4f}**",
    ]
    if "epsilon" in row:
        status = "within budget" if row["epsilon"] <= row["target_epsilon"] + 1e-9 else "OVER BUDGET"
        lines += [
            f"- Privacy unit: {row['unit']}-level DP; accountant: {row['accountant']}",
            f"- ε spent: **{row['epsilon']:.3f}** of a budget of **{row['target_epsilon']:g}** at δ = {row['delta']:g} "
            f"({status}); noise multiplier σ = {row['noise_multiplier']:.3f}",
            f"- What set the budget: {row['budget_note']}",
            *([f"- This ε holds against: {row['adversary']}"] if row.get("adversary") else []),
            f"- Stopped early: {'yes: ' + row.get('stopped_reason', '') if row['stopped_early'] else 'no'}",
            f"- Ledger: `{ledger}` (hash-chained, sealed with this participant's Ed25519 key)",
            "",
            f"Verify: `securefl audit {audit_dir}` re-checks the chain and the seal and recomputes ε with an "
            "independent accountant; it exits non-zero on any tampering or overspend.",
        ]
    return "\n".join(lines) + "\n"


def plot_privacy(privacy: Mapping[str, Mapping[str, Any]], ledgers: Mapping[str, Path], path: Path) -> None:
    """ε spent over rounds per participant, each against its own target (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from securefl.privacy.ledger import read_ledger

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (pid, summary) in enumerate(privacy.items()):
        history = read_ledger(ledgers[pid]).spend_history()
        color = f"C{i % 10}"
        if history:
            rounds = [h["round"] for h in history]
            ax.step(rounds, [h["epsilon_after"] for h in history], where="post", color=color, label=pid)
        ax.axhline(summary["target_epsilon"], color=color, ls="--", lw=0.8)
    first = next(iter(privacy.values()))
    ax.set_xlabel("round (0 = before round 1)")
    ax.set_ylabel(f"ε spent ({first['unit']}-level, {first['accountant']})")
    ax.set_title("Privacy spent per participant (dashed: each one's budget)")
    finish_figure(fig, ax, path)


def finish_figure(fig: Any, ax: Any, path: Path, *, legend_loc: str = "best") -> None:
    """The house style every securefl plot ends with: grid, compact legend, saved and closed.

    ``ax`` is one axes or a sequence of them (a figure of several panels)."""
    import matplotlib.pyplot as plt

    for panel in ax if isinstance(ax, (list, tuple)) else [ax]:
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7, ncol=2, loc=legend_loc)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(metrics: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rounds = [m["round"] for m in metrics]
    ids = list(metrics[-1]["participants"])
    curves = np.array([[m["participants"][pid].get("accuracy", np.nan) for pid in ids] for m in metrics])
    if len(ids) <= 12:
        for j, pid in enumerate(ids):
            ax.plot(rounds, curves[:, j], alpha=0.55, lw=1.2, label=pid)
    else:
        # Too many participants for one line each: their spread, as a band.
        ax.fill_between(rounds, np.nanmin(curves, axis=1), np.nanmax(curves, axis=1), alpha=0.2, color="C0",
                        label=f"min-max of {len(ids)} participants")
    ax.plot(rounds, [m["mean_accuracy"] for m in metrics], color="black", lw=2.4, label="mean")
    ax.set_xlabel("round (0 = after local pre-training)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    finish_figure(fig, ax, path, legend_loc="lower right")


def warm_start_note(config: ExperimentConfig, protocol: Protocol) -> dict[str, str]:
    """How round 1 starts, stated in every report (the A1 benchmark compares protocols under one warm start)."""
    t = config.training
    if protocol.has_own_warm_start:
        return {"warm start": f"{config.protocol}'s own step 0 (an early-stopped local fit)"}
    if protocol.warm_starts():
        return {"warm start": f"each owner's model fitted alone first, early-stopped on its validation split "
                              f"(at most {t.warm_start_max_epochs} epochs, patience {t.warm_start_patience})"}
    return {}


def _markdown(summary: dict[str, Any], protocol: Protocol, metrics: list[dict[str, Any]]) -> str:
    lines = [
        f"# Run report: {summary['protocol']}",
        "",
        f"- Protocol: **{protocol.name}**: {protocol.summary}" + (f" ({protocol.paper})" if protocol.paper else ""),
        f"- Dataset: {summary['dataset']}; rounds: {summary['rounds']}; seed: {summary['seed']}",
        f"- Mean test accuracy: **{summary['mean_accuracy']:.4f}** "
        f"(min {summary['min_accuracy']:.4f}, max {summary['max_accuracy']:.4f})",
        *[f"- {k.capitalize()}: {v}" for k, v in summary["notes"].items()],
        "",
        "| participant | model | train records | final accuracy | after pre-training |",
        "|---|---|---|---|---|",
    ]
    first = metrics[0]["participants"]
    for p in summary["participants"]:
        lines.append(f"| {p['id']} | {model_label(p)} | {train_records(p)} | {p['final_accuracy']:.4f} | "
                     f"{first[p['id']]['accuracy']:.4f} |")
    if summary["privacy_unit"] != "none":
        lines += ["", f"## Privacy ({summary['privacy_unit']}-level DP, secure aggregation: "
                      f"{summary['secure_aggregation']})", "",
                  "| participant | ε spent | target | δ | σ | stopped early | budget |", "|---|---|---|---|---|---|---|"]
        for p in summary["participants"]:
            lines.append(f"| {p['id']} | {p['epsilon']:.3f} | {p['target_epsilon']:g} | {p['delta']:g} | "
                         f"{p['noise_multiplier']:.3f} | {'yes' if p['stopped_early'] else 'no'} | {p['budget_note']} |")
        against = sorted({p["adversary"] for p in summary["participants"] if p.get("adversary")})
        lines += [f"\nEach ε holds against: {text}" for text in against]
        lines += ["", "Verify with `securefl audit RUN_DIR`.", "", "![privacy spent](privacy.png)"]
    if summary["server"]:
        lines += ["", "Server-side models: " + ", ".join(f"{k} = {v:.4f}" for k, v in summary["server"].items())]
    lines += ["", "![accuracy over rounds](accuracy.png)", ""]
    return "\n".join(lines)
