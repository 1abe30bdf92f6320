"""Each protocol's own knobs, chosen on validation data: the values the accuracy benchmark's rows use, and why.

Every candidate is one run of setting A1 (Fashion-MNIST, 10 heterogeneous owners, Dirichlet 0.5, the row's
settings from ``accuracy.py``) with ``data.holdout_size`` train images held out as the evaluation set: the
score is the mean over owners of the headline ``accuracy`` on those held-out *train* images after the
tuning schedule's last round, never on the test set. The candidates of a protocol differ only in its knobs,
listed in ``GRIDS`` below (the reference's value first); the table marks the best of each protocol, and
``accuracy.py`` reads its rows' values off it (the test suite checks that they agree).

The tuning schedule is shorter than the benchmark's (``--rounds``, default 5, one seed): it is fixed in
advance, and what it chooses is a knob's value, not a result.

Usage::

    python benchmarks/tune.py                            # every grid, seed 0, 5 rounds
    python benchmarks/tune.py --protocols fedmd --jobs 2
    python benchmarks/tune.py --replot                   # rewrite the table from tune.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy as bench  # noqa: E402  (the benchmark's rows and its run machinery)

RESULTS = ROOT / "benchmarks" / "results"
HOLDOUT = 10_000

# protocol/variant of accuracy.py's row (with "@ε" for a DP column: its dp_overrides) -> candidate knob settings
# (--set items), the reference's first.
GRIDS: dict[str, list[tuple[str, ...]]] = {
    # The reference's L1 on raw logits, and the KL digest at three temperatures.
    "fedmd/-": [("fedmd.digest_loss=l1",),
                ("fedmd.digest_loss=kl", "fedmd.digest_temperature=1"),
                ("fedmd.digest_loss=kl", "fedmd.digest_temperature=2"),
                ("fedmd.digest_loss=kl", "fedmd.digest_temperature=4")],
    # α: the local model's weight on its own cross-entropy (1 - α on the meme's posteriors); β the meme's.
    # With the reference's step decay of the lr (x0.1 at every third of the rounds) or none: under Adam the decay
    # froze the local models a third of the way in (A1 seed 0: flat from round 11 of 30).
    "fml/local": [("fml.alpha=0.5", "fml.beta=0.5", "fml.lr_decay=0.1"),
                  ("fml.alpha=0.5", "fml.beta=0.5", "fml.lr_decay=1"),
                  ("fml.alpha=0.9", "fml.beta=0.5", "fml.lr_decay=1"),
                  ("fml.alpha=0.1", "fml.beta=0.5", "fml.lr_decay=1")],
    # The generator's weight α_0 (= β_0, as in the reference) and the steps per round that carry it.
    "fedgen/private": [("fedgen.generative_alpha=10", "fedgen.generative_beta=10", "fedgen.early_stop=20"),
                       ("fedgen.generative_alpha=10", "fedgen.generative_beta=10", "fedgen.early_stop=null"),
                       ("fedgen.generative_alpha=1", "fedgen.generative_beta=1", "fedgen.early_stop=20")],
    # Under DP-SGD the private term's gradient is clipped to norm 1 per record and the rows step with momentum
    # SGD at 0.05; the seed-set distillation term is public, so unclipped. After the warm start the peers'
    # posteriors are sharp and that term dominated: at ε = 8 on A1 seed 0, 6 of 10 models fell to chance in
    # round 1 (on digits too; with distill_weight 0 none did). Its weight, chosen at ε = 8 for every DP column.
    "fedh2l/plain@8": [("fedh2l.distill_weight=1",), ("fedh2l.distill_weight=0.3",),
                       ("fedh2l.distill_weight=0.1",)],
}


def grid_key(key: str) -> tuple[str, str, str]:
    """(protocol, variant, ε column) of a GRIDS key."""
    row, _, epsilon = key.partition("@")
    protocol, variant = row.split("/")
    return protocol, variant, epsilon or "inf"


def candidates(keys: list[str] | None) -> list[tuple[str, bench.Row, str, tuple[str, ...]]]:
    """(grid key, row, ε column, --set items) of every candidate of the named grids (all when ``keys`` is None)."""
    chosen = []
    for key, grid in GRIDS.items():
        if keys and key not in keys and key.split("/")[0] not in keys:
            continue
        protocol, variant, epsilon = grid_key(key)
        row = bench.find_row(protocol, variant)
        if row is None:
            raise SystemExit(f"tune.py: no row {key} in accuracy.py")
        chosen += [(key, row, epsilon, (f"data.holdout_size={HOLDOUT}", *knobs)) for knobs in grid]
    return chosen


def key_of(item: dict[str, Any]) -> tuple[str, tuple[str, ...], int, int]:
    return (item["row"], tuple(item["knobs"]), item["seed"], item["rounds"])


def write(items: list[dict[str, Any]], command: str) -> None:
    tmp = RESULTS / "tune.json.tmp"
    tmp.write_text(json.dumps({"command": command, "holdout": HOLDOUT, "items": items}, indent=2) + "\n")
    tmp.replace(RESULTS / "tune.json")
    commands = list(dict.fromkeys(item.get("command", command) for item in items))
    made_by = " and ".join(f"`{c}`" for c in commands) or f"`{command}`"
    lines = [f"Made by {made_by} on a 2-core CPU machine. Setting A1 with {HOLDOUT:,} train images held out: "
             "mean over owners of the headline accuracy on those held-out images (validation, never the test "
             "set) after the last round; **bold**: the best candidate of its row, the value the benchmark uses. "
             "A row ending in @ε is that DP column (record-level, δ = 1e-5, the row's DP settings).",
             "", "| row | knobs | rounds | seed | validation accuracy |", "|---|---|---|---|---|"]
    best = best_knobs(items)
    for item in sorted(items, key=lambda i: (i["row"], i["knobs"])):
        knobs = ", ".join(k for k in item["knobs"])
        score = f"{100 * item['val_accuracy']:.1f}"
        if best.get(item["row"]) == tuple(item["knobs"]):
            score = f"**{score}**"
        lines.append(f"| {item['row']} | {knobs} | {item['rounds']} | {item['seed']} | {score} |")
    (RESULTS / "tune.md").write_text("\n".join(lines) + "\n")


def best_knobs(items: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """Each row's candidate with the highest validation accuracy (ties: the earlier, i.e. the reference's)."""
    best: dict[str, dict[str, Any]] = {}
    for item in items:
        current = best.get(item["row"])
        if current is None or item["val_accuracy"] > current["val_accuracy"]:
            best[item["row"]] = item
    return {row: tuple(item["knobs"]) for row, item in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", nargs="*", help=f"grids to run (default all: {', '.join(GRIDS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--replot", action="store_true", help="rewrite tune.md from tune.json, running nothing")
    args = parser.parse_args(argv)
    command = "python benchmarks/tune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = RESULTS / "tune.json"
    previous = json.loads(path.read_text()) if path.exists() else {"items": []}
    # Each item keeps the command that made it (items of files written before that: the file's one command).
    items: dict[tuple[str, tuple[str, ...], int, int], dict[str, Any]] = {
        key_of(i): {"command": previous.get("command", command), **i} for i in previous["items"]}
    if args.replot:
        write(list(items.values()), previous.get("command", command))
        print((RESULTS / "tune.md").read_text())
        return 0
    chosen = candidates(args.protocols)
    tasks = [("A1", row, epsilon, args.seed, False, args.data_dir, args.rounds, knobs)
             for _, row, epsilon, knobs in chosen]
    failed = 0
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs) as pool:
        for (key, *_), task, res in zip(chosen, tasks, pool.imap(bench._one_run, tasks), strict=True):
            knobs = task[7]
            if "summary" not in res:
                failed += 1
                print(f"FAILED {key} {knobs}: {res.get('failed') or res.get('refused')}", file=sys.stderr)
                continue
            item = {"row": key, "knobs": list(knobs[1:]), "seed": args.seed,
                    "rounds": args.rounds, "val_accuracy": res["summary"]["mean_accuracy"], "command": command}
            items[key_of(item)] = item
            # Another invocation may have written results since this one started: keep them.
            on_disk = json.loads(path.read_text())["items"] if path.exists() else []
            write(list({**{key_of(i): i for i in on_disk}, **items}.values()), command)
            print(f"{item['row']} {', '.join(item['knobs'])}: {100 * item['val_accuracy']:.1f}", flush=True)
    print((RESULTS / "tune.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
