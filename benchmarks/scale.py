"""Does the simulation runtime scale linearly in the number of participants K?

One FedAvg simulation per K (default 100, 300 and 1,000 participants), each in a fresh Python process so that
its peak memory is its own: the embedded digits (scikit-learn, 8x8, 10 classes), every participant the zoo's
smallest MLP (``mlp_s``, 6,570 parameters on 8x8 inputs), ``run.participation = 0.1``, signing on (the
default), no DP and no secure aggregation. FedAvg's uplink is the MLP's weights, 6,570 floats (26 KB) per
sampled participant: a digits-sized payload that needs no public set, so every training record stays private
and the set-up holds no per-owner transfer learning that would swamp the runtime's own cost.

With K = 1,000 the 1,347 training records of digits give each owner 1 or 2: the split is IID
(``data.partition.kind = iid``, a seeded permutation cut into K near-equal parts), since a Dirichlet split
cannot give every owner even one record at that size (``min_size`` would have to be 1, and Dirichlet(0.5)
proportions leave hundreds of owners empty). An owner of fewer than 5 records keeps no validation split.

Measured per K, in its own process:

- set-up: building the ``Federation`` (data split, K models and optimizers, K+1 Ed25519 keys, the layer stack);
- first round: round 0 (the initial evaluation of every model and checkpoint) plus round 1;
- per round: wall time of each later round, from one round's end (after its checkpoint) to the next's; the
  median is reported. Every round evaluates all K models and checkpoints all K participants' states, as
  ``Federation.run`` does. Set-up and rounds are also given in the process's CPU time, which other work on
  the shared cores does not inflate, so linearity can be read even when the wall times are disturbed;
- peak RSS: the process's high-water mark (``VmHWM`` of ``/proc/self/status``, the same figure as
  ``getrusage(RUSAGE_SELF).ru_maxrss``) before set-up, after set-up and at the end. torch's allocations are
  invisible to tracemalloc, so resident memory is the honest measure; the growth above the baseline (the
  interpreter, torch, the data set: the same for every K) is what should be linear in K.

Before any of it, the process runs a federation of two participants for one round: securefl imports much of
what a run needs only when first needed, and that one-off cost (seconds, and a hundred MB) belongs to no K.

Each K runs three times, in alternating order (100, 300, 1000, then 1000, 300, 100, ...): the cores are shared,
so each time is the least of its repetitions and each memory figure their median. The table gives each figure's
ratio to the smallest K beside K's own ratio, so linearity reads off directly (time(K) / time(100) against
K / 100), and what each participant added since the previous K, which is constant under linear growth whatever
the fixed cost.

Usage::

    nice -n 5 python benchmarks/scale.py                 # K = 100, 300, 1000; 4 rounds, 3 repetitions (~5 min)
    python benchmarks/scale.py --quick                   # K = 10, 30; 1 round, once; writes scale_quick.{json,md}
    python benchmarks/scale.py --participants 100 1300   # other sizes (digits has 1,347 training records)

Writes ``benchmarks/results/scale.json`` and ``benchmarks/results/scale.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

PROTOCOL = "fedavg"
MODEL = "mlp_s"
PARTICIPATION = 0.1
# Fixed in advance: the first round carries round 0, so three later rounds give the median.
ROUNDS = 4
QUICK_ROUNDS = 1
PARTICIPANTS = [100, 300, 1000]
QUICK_PARTICIPANTS = [10, 30]
# Fresh processes per K: the least time of three is what the runtime costs when the shared cores let it run.
REPEATS = 3
SEED = 0
WARM_UP_PARTICIPANTS = 2
# A ratio to the smallest K this much above K's own ratio is flagged as super-linear: on the shared cores the
# least of three repetitions still moves by 10-20 % from one benchmark to the next.
SUPERLINEAR = 1.2


def scale_config(participants: int, rounds: int) -> Any:
    """The benchmark's experiment for ``participants`` owners, built in code as the tests build theirs."""
    from securefl.config import parse_config

    return parse_config({
        "protocol": PROTOCOL,
        "run": {"seed": SEED, "rounds": rounds, "participation": PARTICIPATION},
        "data": {"dataset": "digits", "partition": {"kind": "iid"}, "val_fraction": 0.15},
        "training": {"batch_size": 32, "local_epochs": 1},
        "participants": [{"id": f"p{i}", "model": MODEL} for i in range(participants)],
    })


def peak_rss_mb() -> float:
    """The process's resident-set high-water mark (``VmHWM``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def measure_one(participants: int, rounds: int) -> dict[str, Any]:
    """Run one simulation of ``participants`` owners in this process; its times and memory high-water marks."""
    import torch

    # The cores are shared: one intra-op thread, as the tests run, keeps the timings free of oversubscription.
    torch.set_num_threads(1)
    from securefl.runtime.federation import Federation

    def clocks() -> tuple[float, float]:
        """Wall time, and this process's CPU time (which other work on the shared cores does not inflate)."""
        return time.perf_counter(), time.process_time()

    round_ends: dict[int, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="securefl-scale-") as tmp:
        # A federation of two, run to the end first: securefl imports much of what a run needs only when it is
        # first needed (the data set, opacus, the report's plotting), and that one-off cost belongs to no K.
        Federation(scale_config(WARM_UP_PARTICIPANTS, 1), Path(tmp) / "warm-up", progress=False,
                   keys=Path(tmp) / "keys").run()
        baseline_rss = peak_rss_mb()
        start = clocks()
        config = scale_config(participants, rounds)
        fed = Federation(config, Path(tmp) / "run", progress=False, keys=Path(tmp) / "keys",
                         on_round_end=lambda rnd: round_ends.__setitem__(rnd, clocks()))
        setup_done = clocks()
        setup_rss = peak_rss_mb()
        fed.run()
        end = clocks()
        records = [p.num_samples for p in fed.parties]
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]

    def between(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        return b[0] - a[0], b[1] - a[1]

    later = [between(round_ends[r - 1], round_ends[r]) for r in range(2, rounds + 1)]
    # In a one-round run there is no later round: the first (with round 0) stands in.
    per_round = later or [between(setup_done, round_ends[1])]
    # A round's elapsed_s in metrics.jsonl covers sampling, the sampled owners' steps and the aggregation; the
    # rest of its wall time is the evaluation of all K models and the checkpoint of all K states.
    exchange = [row["elapsed_s"] for row in metrics if row["round"] >= (2 if later else 1)]
    return {
        "participants": participants,
        "sampled_per_round": fed.sampled_per_round(),
        "records_per_owner": [min(records), max(records)],
        "setup_s": setup_done[0] - start[0],
        "setup_cpu_s": setup_done[1] - start[1],
        "first_round_s": round_ends[1][0] - setup_done[0],
        "round_s": statistics.median(wall for wall, _ in per_round),
        "round_cpu_s": statistics.median(cpu for _, cpu in per_round),
        "round_s_each": [wall for wall, _ in later],
        "exchange_s": statistics.median(exchange),
        "evaluate_checkpoint_s": statistics.median(wall - e for (wall, _), e in zip(per_round, exchange, strict=True)),
        "finish_s": end[0] - round_ends[rounds][0],
        "baseline_rss_mb": baseline_rss,
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": peak_rss_mb(),
        # What a change to the runtime must leave alone: every metric but the timings, bit for bit.
        "final_mean_accuracy": metrics[-1]["mean_accuracy"],
        "metrics_sha256": hashlib.sha256(json.dumps([{k: v for k, v in row.items() if k != "elapsed_s"}
                                                     for row in metrics], sort_keys=True).encode()).hexdigest(),
        "torch": torch.__version__,
    }


def run_in_fresh_process(participants: int, rounds: int) -> dict[str, Any]:
    """:func:`measure_one` in a child process, so each K's peak memory is its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--one", str(participants), "--rounds", str(rounds)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"K = {participants} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


TIMES = ("setup_s", "setup_cpu_s", "first_round_s", "round_s", "round_cpu_s", "exchange_s", "evaluate_checkpoint_s",
         "finish_s")
MEMORY = ("baseline_rss_mb", "setup_rss_mb", "peak_rss_mb")
# The figures that should grow linearly in K, with the ratio and the per-participant growth of each.
SCALED = ("setup_s", "setup_cpu_s", "round_s", "round_cpu_s", "exchange_s", "evaluate_checkpoint_s",
          "rss_above_baseline_mb")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One K's repetitions as one row: each time the least (other work on the shared cores only ever adds
    time), each memory figure the median; the repetitions themselves are kept beside it."""
    digests = {run["metrics_sha256"] for run in runs}
    if len(digests) != 1:
        raise RuntimeError(f"K = {runs[0]['participants']}: repetitions computed different metrics ({digests})")
    row = {**runs[0], "repetitions": len(runs), "runs": runs}
    row.update({name: min(run[name] for run in runs) for name in TIMES})
    row.update({name: statistics.median(run[name] for run in runs) for name in MEMORY})
    row["rss_above_baseline_mb"] = row["peak_rss_mb"] - row["baseline_rss_mb"]
    return row


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's figures divided by the first row's (linear growth gives K's own ratio), and what each
    participant added since the previous K (constant under linear growth, whatever the fixed cost)."""
    base = rows[0]
    out = []
    previous = None
    for row in rows:
        marginal = None if previous is None else {
            name: (row[name] - previous[name]) / (row["participants"] - previous["participants"]) for name in SCALED}
        previous = row
        ratios = {"participants": row["participants"] / base["participants"]}
        ratios.update({name: row[name] / base[name] for name in SCALED})
        out.append({**row, "ratios": ratios, "per_added_participant": marginal})
    return out


def _ratio(value: float, linear: float) -> str:
    """A ratio to the smallest K, in bold where it exceeds K's own ratio by more than the timing noise."""
    text = f"{value:.2f}"
    return f"**{text}**" if value > SUPERLINEAR * linear else text


def markdown(rows: list[dict[str, Any]], command: str, rounds: int, repeats: int) -> str:
    base = rows[0]["participants"]
    lines = [
        "# Scaling of the simulation runtime in the number of participants K",
        "",
        f"Made by `{command}` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{platform.machine()} with {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
        f"torch {rows[0]['torch']} on 1 thread; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"FedAvg with the zoo's smallest MLP (`{MODEL}`, 6,570 parameters on 8x8 digits) at every participant: "
        "its uplink, the model's weights (26 KB), is a digits-sized payload that needs no public set, so no "
        "per-owner transfer learning swamps the runtime's own cost. Digits' 1,347 training records are split IID "
        "(a Dirichlet split cannot give 1,000 owners a record each; owners of fewer than 5 records keep no "
        f"validation split); participation {PARTICIPATION}, signing on, no DP, no secure aggregation, seed {SEED}, "
        f"{rounds} round{'s' if rounds > 1 else ''}. "
        + (f"Each K runs in a fresh process, {repeats} times in alternating order: each time below is the least "
           "of them (other work on the shared cores only ever adds time), each memory figure the median; every "
           "repetition computed the same metrics, bit for bit." if repeats > 1 else
           "Each K runs once, in a fresh process."),
        "",
        "Set-up: building the `Federation` (split, K models and optimizers, K+1 signing keys, layers). First round: "
        "round 0 (every model evaluated, first checkpoint) and round 1. s/round: median over rounds 2 on (in a "
        "one-round run, the first round), split into the exchange (`elapsed_s` of `metrics.jsonl`: sampling, the "
        "sampled owners' training, signing and verification, aggregation) and the rest, which evaluates all K "
        "models and checkpoints all K states. CPU: the process's CPU time over the same span, which other work "
        "on the shared cores does not inflate (the checkpoint's fsync wait is not in it). Peak RSS: `VmHWM` at "
        "the end of the process; above baseline: minus the high-water mark before set-up, after a warm-up "
        f"federation of {WARM_UP_PARTICIPANTS} participants and one round in the same process (what securefl "
        "imports when first needed, and the data set, count in no K).",
        "",
        "| K | sampled per round | training records per owner | set-up s (CPU) | first round s | s/round (CPU) "
        "| exchange s | evaluate + checkpoint s | peak RSS MB | RSS above baseline MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        low, high = row["records_per_owner"]
        lines.append(
            f"| {row['participants']:,} | {row['sampled_per_round']} | {low}-{high} "
            f"| {row['setup_s']:.2f} ({row['setup_cpu_s']:.2f}) | {row['first_round_s']:.2f} "
            f"| {row['round_s']:.3f} ({row['round_cpu_s']:.3f}) | {row['exchange_s']:.3f} "
            f"| {row['evaluate_checkpoint_s']:.3f} | {row['peak_rss_mb']:.0f} | {row['rss_above_baseline_mb']:.0f} |")
    lines += [
        "",
        f"Ratios to K₀ = {base:,}: linear growth gives K / K₀ at most (less where a fixed cost weighs). In bold: "
        f"more than {SUPERLINEAR:g} x K / K₀.",
        "",
        "| K | K / K₀ | set-up | set-up CPU | s/round | s/round CPU | exchange | evaluate + checkpoint "
        "| RSS above baseline |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratios = row["ratios"]
        linear = ratios["participants"]
        lines.append(f"| {row['participants']:,} | {linear:.1f} | "
                     + " | ".join(_ratio(ratios[name], linear) for name in SCALED) + " |")
    lines += [
        "",
        "Per added participant: the growth since the previous K divided by the participants added, constant under "
        f"linear growth whatever the fixed cost. In bold: more than {SUPERLINEAR:g} x the line above.",
        "",
        "| K | set-up ms | set-up CPU ms | s/round ms | s/round CPU ms | peak RSS KB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    columns = (("setup_s", 1e3, ".2f"), ("setup_cpu_s", 1e3, ".2f"), ("round_s", 1e3, ".2f"),
               ("round_cpu_s", 1e3, ".2f"), ("rss_above_baseline_mb", 1024, ".0f"))
    for before, row in zip([None, *rows[1:]], rows[1:], strict=False):
        cells = []
        for name, scale, fmt in columns:
            value = row["per_added_participant"][name]
            text = format(scale * value, fmt)
            grew = before is not None and value > SUPERLINEAR * before["per_added_participant"][name]
            cells.append(f"**{text}**" if grew else text)
        lines.append(f"| {row['participants']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"K = {QUICK_PARTICIPANTS}, {QUICK_ROUNDS} rounds, written to scale_quick.{{json,md}}")
    parser.add_argument("--participants", type=int, nargs="+", default=None, metavar="K",
                        help=f"numbers of participants (default {PARTICIPANTS})")
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds per run (default {ROUNDS})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"fresh processes per K, in alternating order (default {REPEATS}, 1 with --quick)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    parser.add_argument("--one", type=int, default=None, metavar="K", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    if rounds < 1:
        parser.error(f"--rounds must be >= 1, got {rounds}")
    repeats = args.repeats or (1 if args.quick else REPEATS)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    if args.one is not None:
        print(json.dumps(measure_one(args.one, rounds)))
        return 0
    sizes = args.participants or (QUICK_PARTICIPANTS if args.quick else PARTICIPANTS)
    if min(sizes) < 1:
        parser.error(f"--participants must be >= 1, got {sizes}")

    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in sizes}
    for rep in range(repeats):
        # Alternate the order, so a load that rises or falls during the benchmark hits every K alike.
        for k in sizes if rep % 2 == 0 else list(reversed(sizes)):
            row = run_in_fresh_process(k, rounds)
            print(f"K = {k:,} (repetition {rep + 1}): set-up {row['setup_s']:.2f} s, {row['round_s']:.3f} s/round, "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB", file=sys.stderr)
            runs[k].append(row)
    rows = with_ratios([combine(runs[k]) for k in sizes])

    command = (
        "python benchmarks/scale.py"
        + (" --quick" if args.quick else "")
        + (f" --participants {' '.join(map(str, args.participants))}" if args.participants else "")
        + (f" --rounds {args.rounds}" if args.rounds else "")
        + (f" --repeats {args.repeats}" if args.repeats else "")
    )
    stem = "scale_quick" if args.quick else "scale"
    payload = {"command": command, "protocol": PROTOCOL, "model": MODEL, "participation": PARTICIPATION,
               "rounds": rounds, "repeats": repeats, "seed": SEED, "memory": "VmHWM of /proc/self/status, one process per K",
               "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(rows, command, rounds, repeats)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
