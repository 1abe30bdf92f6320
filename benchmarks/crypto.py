"""Benchmarks B1-B3 of benchmarks.md: the cost of securefl's protections, as ratios in one run.

B1  CKKS through securefl against the same steps written directly against
    TenSEAL (same parameters, same payloads): K = 10 payloads of 50,000
    floats, encrypt -> serialize -> aggregate (deserialize + sum + 1/K) ->
    decrypt. Targets: time ratio <= 1.25, bytes per float within 10 %.
    Participants hold the secret key and securefl encrypts with it (SEAL's
    symmetric encryption); so do the raw steps (a TenSEAL context with
    ``encryption_type=SYMMETRIC``; the aggregator gets it without the secret
    key). Informational rows give raw TenSEAL with public-key encryption.
B2  Pairwise masking (SecAgg, Bonawitz et al. 2017) against CKKS on the same
    payloads, end to end, with one participant dropping after key sharing
    and recovered. Targets: >= 20x faster, <= 3x the plaintext fp32 bytes.
B3  One FedMD round of setting A1 on Fashion-MNIST (K = 10, all private
    data), plain against CKKS against masking against DP-SGD, alternated;
    then securefl's DP-SGD trainer against raw Opacus on one epoch. Targets:
    CKKS adds <= 10 %; DP-SGD <= 1.3x plain; our trainer <= 1.15x Opacus. Skipped, with the reason,
    when Fashion-MNIST is not installed.

The targets of B1 and B2 compare like with like on one core: both TenSEAL
contexts of B1 have a one-thread pool (securefl then encrypts chunk by chunk,
like the raw steps), and masking runs on one core. By default securefl lets
TenSEAL encrypt a payload's chunks on every core (``KeyHolderContext.threads``);
informational rows give the CKKS round that way.

Timings alternate between the compared paths inside every repetition (the
machine is shared and noisy) and the median over repetitions is reported.

Usage::

    python benchmarks/crypto.py            # full run (about 15 minutes on 2 cores, most of it B3)
    python benchmarks/crypto.py --quick    # fewer repetitions
    python benchmarks/crypto.py --only B3 --repeats 3   # one measurement, written to crypto_b3.{json,md}

Writes ``benchmarks/results/crypto.json`` (a list of rows ``{measure, value,
target, better, unit}``) and ``benchmarks/results/crypto.md``, and prints the
table.

Adding a measurement: write a function ``bN_name(bench: Bench) -> list[Row]``
and append it to :data:`MEASUREMENTS`; :func:`main` runs every entry in order,
shares the progress bar and writes all rows to the same files.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import tenseal as ts  # noqa: E402
from tqdm import tqdm  # noqa: E402

from securefl.core.message import AGGREGATOR, Message  # noqa: E402
from securefl.core.sealed import SealedTensor  # noqa: E402
from securefl.crypto.ckks import CkksParams, KeyHolderContext, PublicContext, seal_tensor  # noqa: E402
from securefl.crypto.masking import MaskingSession  # noqa: E402
from securefl.layers.ckks_aggregator import CkksAggregator  # noqa: E402
from securefl.layers.masking_aggregator import SecAggSimulation  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One result line. ``target`` is ``None`` for informational rows."""

    measure: str
    value: float
    target: float | None
    better: str  # "lower" or "higher"
    unit: str

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value <= self.target if self.better == "lower" else self.value >= self.target


@dataclass
class Bench:
    """What every measurement function gets: the workload, the repetitions and the progress bar."""

    participants: int = 10
    length: int = 50_000
    repeats: int = 9
    seed: int = 0
    params: CkksParams = field(default_factory=CkksParams)
    progress: tqdm | None = None

    def tick(self, label: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(label, refresh=False)
            self.progress.update(1)

    def payloads(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.empty(self.length).uniform_(-10, 10, generator=gen) for _ in range(self.participants)]


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _msg(sender: str, kind: str = "logits", receiver: str = AGGREGATOR) -> Message:
    return Message(sender=sender, receiver=receiver, run_id="bench", round=1, kind=kind)


def _payload_bytes(msg: Message) -> int:
    total = 0
    for value in msg.payload.values():
        if isinstance(value, bytes):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(v) for v in value)
        else:
            total += value.numel() * value.element_size()
    return total


# -- the compared paths ------------------------------------------------------------------------------
def securefl_ckks_round(key_ctx: KeyHolderContext, public_bytes: bytes, xs: list[torch.Tensor]):
    """encrypt -> serialize (client) -> deserialize + mean (aggregator) -> decrypt (key holder), via securefl."""
    replies = [seal_tensor(key_ctx, x).attach(_msg(f"p{k}"), "logits") for k, x in enumerate(xs)]
    aggregator = CkksAggregator(PublicContext.from_bytes(public_bytes))
    consensus = aggregator.mean(replies, "logits")
    down = consensus.attach(_msg(AGGREGATOR, "consensus", "*"), "consensus")
    result = key_ctx.open(SealedTensor.from_message(down, "consensus"))
    return result, sum(_payload_bytes(r) for r in replies)


def raw_encrypt(ctx: ts.Context, x: np.ndarray, slots: int) -> list[ts.CKKSVector]:
    """Encryption alone, for the throughput figure quoted in benchmarks.md."""
    return [ts.ckks_vector(ctx, x[i : i + slots]) for i in range(0, x.size, slots)]


def raw_tenseal_round(ctx: ts.Context, public_bytes: bytes, xs: list[np.ndarray], slots: int):
    """The same steps written directly against TenSEAL."""
    uploads = [[ts.ckks_vector(ctx, x[i : i + slots]).serialize() for i in range(0, x.size, slots)] for x in xs]
    public = ts.context_from(public_bytes)
    total = [ts.ckks_vector_from(public, b) for b in uploads[0]]
    for upload in uploads[1:]:
        for i, b in enumerate(upload):
            total[i] += ts.ckks_vector_from(public, b)
    down = [(v * (1.0 / len(xs))).serialize() for v in total]
    result = np.concatenate([np.asarray(ts.ckks_vector_from(ctx, b).decrypt()) for b in down])
    return result, sum(len(b) for u in uploads for b in u)


def masking_round(xs: list[torch.Tensor], dropped: str, threshold: int):
    """SecAgg end to end: keys, shares, masked inputs of the survivors, unmasking with one dropout."""
    ids = [f"p{k}" for k in range(len(xs))]
    sim = SecAggSimulation.setup(MaskingSession(run_id="bench", round=1, participant_ids=ids, threshold=threshold))
    replies = [
        sim.clients[pid].mask_input(x, field="logits").attach(_msg(pid), "logits")
        for pid, x in zip(ids, xs, strict=True)
        if pid != dropped
    ]
    sim.drop(dropped)
    result = sim.aggregator.mean(replies, "logits")
    masked = sum(_payload_bytes(r) for r in replies)
    overhead = sum(_payload_bytes(m) for m in sim.traffic)
    return result, masked, overhead


# -- B1 ----------------------------------------------------------------------------------------------------
def b1_ckks_vs_raw(bench: Bench) -> list[Row]:
    xs = bench.payloads()
    xs_np = [x.double().numpy() for x in xs]
    key_ctx = KeyHolderContext.generate(bench.params, threads=1)
    pooled = KeyHolderContext.from_committee_secret(key_ctx.export_secret_for_committee())  # default: all cores
    public_bytes = key_ctx.public().to_bytes()
    def raw_context(kind: ts.ENCRYPTION_TYPE) -> ts.Context:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=bench.params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(bench.params.coeff_mod_bit_sizes),
            encryption_type=kind,
            n_threads=1,
        )
        ctx.global_scale = 2.0**bench.params.global_scale_bits
        return ctx

    # Secret-key encryption, like securefl's participants; the aggregator's copy has no key at all.
    raw_ctx = raw_context(ts.ENCRYPTION_TYPE.SYMMETRIC)
    raw_public_bytes = raw_ctx.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    # Public-key encryption (informational): the aggregator's copy holds the public key only.
    asym_ctx = raw_context(ts.ENCRYPTION_TYPE.ASYMMETRIC)
    asym_pub = asym_ctx.copy()
    asym_pub.make_context_public()
    asym_public_bytes = asym_pub.serialize(save_galois_keys=False, save_relin_keys=False)
    expected = np.mean(xs_np, axis=0)

    t_ours, t_raw, t_enc, t_pool, t_asym = [], [], [], [], []
    for rep in range(bench.repeats):
        # Alternate which path goes first, so drift in machine load hits both alike.
        order = ("ours", "raw", "pool", "asym") if rep % 2 == 0 else ("asym", "pool", "raw", "ours")
        for which in order:
            if which == "ours":
                dt, (ours, ours_bytes) = _timed(lambda: securefl_ckks_round(key_ctx, public_bytes, xs))
                t_ours.append(dt)
            elif which == "pool":
                dt, _ = _timed(lambda: securefl_ckks_round(pooled, public_bytes, xs))
                t_pool.append(dt)
            elif which == "asym":
                dt, (asym, asym_bytes) = _timed(
                    lambda: raw_tenseal_round(asym_ctx, asym_public_bytes, xs_np, bench.params.slots))
                t_asym.append(dt)
            else:
                dt, (raw, raw_bytes) = _timed(lambda: raw_tenseal_round(raw_ctx, raw_public_bytes, xs_np, bench.params.slots))
                t_raw.append(dt)
        x0 = xs_np[rep % len(xs_np)]
        dt, _ = _timed(partial(raw_encrypt, raw_ctx, x0, bench.params.slots))
        t_enc.append(dt)
        bench.tick(f"B1 rep {rep + 1}")

    floats = bench.participants * bench.length
    ours_bpf, raw_bpf, asym_bpf = ours_bytes / floats, raw_bytes / floats, asym_bytes / floats
    return [
        Row("B1 CKKS time, securefl / raw TenSEAL", statistics.median(t_ours) / statistics.median(t_raw), 1.25, "lower", "ratio"),
        Row("B1 CKKS bytes per float, securefl / raw TenSEAL", ours_bpf / raw_bpf, 1.10, "lower", "ratio"),
        Row("B1 securefl CKKS round time (K=10 x 50k floats)", statistics.median(t_ours), None, "lower", "s"),
        Row("B1 raw TenSEAL round time (K=10 x 50k floats)", statistics.median(t_raw), None, "lower", "s"),
        Row(f"B1 securefl CKKS round time, encryption on {pooled.threads} threads", statistics.median(t_pool), None,
            "lower", "s"),
        Row("B1 securefl bytes per float (uplink)", ours_bpf, None, "lower", "bytes"),
        Row("B1 raw TenSEAL bytes per float (uplink)", raw_bpf, None, "lower", "bytes"),
        Row("B1 raw TenSEAL round time, public-key encryption", statistics.median(t_asym), None, "lower", "s"),
        Row("B1 raw TenSEAL bytes per float (uplink), public-key encryption", asym_bpf, None, "lower", "bytes"),
        Row("B1 CKKS ciphertext size / fp32 size", ours_bpf / 4, None, "lower", "ratio"),
        Row("B1 raw TenSEAL encryption throughput (secret key)", bench.length / statistics.median(t_enc), None, "higher",
            "floats/s"),
        Row("B1 securefl mean, max abs error", float(np.abs(ours.double().numpy() - expected).max()), 1e-5, "lower", "abs"),
        Row("B1 raw TenSEAL mean, max abs error", float(np.abs(raw - expected).max()), 1e-5, "lower", "abs"),
        Row("B1 raw TenSEAL mean, max abs error, public-key encryption", float(np.abs(asym - expected).max()), 1e-5,
            "lower", "abs"),
    ]


# -- B2 ----------------------------------------------------------------------------------------------------
def b2_masking_vs_ckks(bench: Bench) -> list[Row]:
    xs = bench.payloads()
    dropped = "p3"
    survivors = [x for k, x in enumerate(xs) if f"p{k}" != dropped]
    expected = torch.stack([x.double() for x in survivors]).mean(0)
    key_ctx = KeyHolderContext.generate(bench.params, threads=1)  # one core, like masking
    pooled = KeyHolderContext.from_committee_secret(key_ctx.export_secret_for_committee())
    public_bytes = key_ctx.public().to_bytes()
    threshold = MaskingSession.default_threshold(bench.participants)

    t_mask, t_ckks, t_pool = [], [], []
    for rep in range(bench.repeats):
        order = ("mask", "ckks", "pool") if rep % 2 == 0 else ("pool", "ckks", "mask")
        for which in order:
            if which == "mask":
                dt, (masked_mean, masked_bytes, overhead) = _timed(lambda: masking_round(xs, dropped, threshold))
                t_mask.append(dt)
            elif which == "pool":
                dt, _ = _timed(lambda: securefl_ckks_round(pooled, public_bytes, survivors))
                t_pool.append(dt)
            else:
                # A dropout costs CKKS nothing: the aggregator sums whatever arrived.
                dt, (ckks_mean, ckks_bytes) = _timed(lambda: securefl_ckks_round(key_ctx, public_bytes, survivors))
                t_ckks.append(dt)
        bench.tick(f"B2 rep {rep + 1}")

    fp32 = len(survivors) * bench.length * 4
    return [
        Row(
            "B2 speed-up, masking vs CKKS (end to end, 1 dropout)",
            statistics.median(t_ckks) / statistics.median(t_mask),
            20.0,
            "higher",
            "x",
        ),
        Row(f"B2 speed-up, masking vs CKKS with encryption on {pooled.threads} threads",
            statistics.median(t_pool) / statistics.median(t_mask), None, "higher", "x"),
        Row("B2 masking traffic / plaintext fp32 bytes (all messages)", (masked_bytes + overhead) / fp32, 3.0, "lower", "ratio"),
        Row("B2 masked input / plaintext fp32 bytes", masked_bytes / fp32, None, "lower", "ratio"),
        Row("B2 CKKS uplink / plaintext fp32 bytes", ckks_bytes / fp32, None, "lower", "ratio"),
        Row("B2 masking round time (K=10, 1 dropout)", statistics.median(t_mask), None, "lower", "s"),
        Row("B2 CKKS round time (9 survivors)", statistics.median(t_ckks), None, "lower", "s"),
        Row(f"B2 CKKS round time (9 survivors), encryption on {pooled.threads} threads", statistics.median(t_pool),
            None, "lower", "s"),
        # Fixed-point rounding (<= K * 2^-25 / K) plus rounding the mean to the payloads' float32.
        Row("B2 masking mean, max abs error", float((masked_mean.double() - expected).abs().max()), 1e-6, "lower", "abs"),
        Row("B2 CKKS mean, max abs error", float((ckks_mean.double() - expected).abs().max()), 1e-5, "lower", "abs"),
    ]


# -- B3: one FedMD round on Fashion-MNIST, K = 10 ---------------------------------------------------------
def _fedmd_federation(out: Path, **changes: object):  # type: ignore[no-untyped-def]
    """Setting A1's FedMD federation on Fashion-MNIST, pre-trained for one epoch (step 0 is not part of a round).

    All 55,000 private images, as in the accuracy benchmark: CKKS costs the same per round whatever the private
    data (it seals 5,000 x 10 consensus logits per participant), so a subset would overstate its share. (On a
    20,000-image subset, B3 measured 1.102.)
    """
    from securefl.config import deep_merge, parse_config
    from securefl.runtime.federation import Federation

    raw = {
        "protocol": "fedmd",
        "run": {"seed": 0, "rounds": 100},
        "data": {"dataset": "fashion_mnist", "public_size": 5000,
                 "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "training": {"batch_size": 64},
        "participants": [{"id": f"p{i}", "model": m} for i, m in enumerate(
            ["cnn_s", "mlp_m", "resnet_s", "mlp_l", "deepcnn_s", "mlp_s", "cnn_s", "resnet_s", "mlp_m", "deepcnn_s"])],
        "fedmd": {"alignment_size": 5000, "transfer_max_epochs": 1, "revisit_epochs": 1, "revisit_batch_size": 64},
    }
    fed = Federation(parse_config(deep_merge(raw, dict(changes))), out, progress=False)
    for party in fed.parties:
        fed.protocol.prepare_party(party)
    return fed


def _time_round(fed, rnd: int) -> float:  # type: ignore[no-untyped-def]
    sampled = fed.sample(rnd)
    fed._current_round = rnd
    start = time.perf_counter()
    fed._round(rnd, sampled, tqdm(disable=True))
    return time.perf_counter() - start


def b3_fedmd_round(bench: Bench) -> list[Row]:
    """Plain vs CKKS vs masking vs DP-SGD, one FedMD round each, alternated; then DP-SGD vs raw Opacus."""
    import tempfile

    from securefl.data.datasets import DataError, load_fashion_mnist

    try:
        load_fashion_mnist()
    except DataError as exc:
        print(f"B3 skipped: {exc}", file=sys.stderr)
        return []
    # Each repetition is four ~9 s FedMD rounds; five of them keep the median clear of one disturbed round.
    repeats = min(bench.repeats, 5)
    with tempfile.TemporaryDirectory() as tmp:
        feds = {
            "plain": _fedmd_federation(Path(tmp) / "plain"),
            "ckks": _fedmd_federation(Path(tmp) / "ckks", secure_aggregation="ckks"),
            "masking": _fedmd_federation(Path(tmp) / "masking", secure_aggregation="masking"),
            "dp_sgd": _fedmd_federation(Path(tmp) / "dp", privacy={"unit": "record", "target_epsilon": 8.0}),
        }
        times: dict[str, list[float]] = {k: [] for k in feds}
        for rep in range(repeats):
            names = list(feds) if rep % 2 == 0 else list(reversed(feds))
            for name in names:
                times[name].append(_time_round(feds[name], rep + 1))
            bench.tick(f"B3 rep {rep + 1}")
        for fed in feds.values():
            if fed.privacy is not None:
                fed.privacy.close_all()
    med = {k: statistics.median(v) for k, v in times.items()}
    opacus_ratio, t_ours, t_raw = _dp_trainer_vs_raw_opacus(repeats)
    return [
        Row("B3 FedMD round, CKKS / plain (K=10, Fashion-MNIST)", med["ckks"] / med["plain"], 1.10, "lower", "ratio"),
        Row("B3 FedMD round, masking / plain", med["masking"] / med["plain"], None, "lower", "ratio"),
        Row("B3 FedMD round, DP-SGD / plain", med["dp_sgd"] / med["plain"], 1.30, "lower", "ratio"),
        Row("B3 FedMD round time, plain", med["plain"], None, "lower", "s"),
        Row("B3 securefl DP-SGD trainer / raw Opacus (one epoch, 6,000 images)", opacus_ratio, 1.15, "lower", "ratio"),
        Row("B3 raw Opacus epoch time", t_raw, None, "lower", "s"),
        Row("B3 securefl DP-SGD epoch time", t_ours, None, "lower", "s"),
    ]


def _dp_trainer_vs_raw_opacus(repeats: int) -> tuple[float, float, float]:
    """Same model, data, batch, σ and clip: our trainer against Opacus's own make_private loop."""
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from securefl.data.datasets import load_fashion_mnist
    from securefl.models.zoo import build_model
    from securefl.privacy.dp_sgd import DPSGDTrainer

    data = load_fashion_mnist()
    x, y = data.x_train[:6000], data.y_train[:6000]

    def ours() -> None:
        torch.manual_seed(0)
        model = build_model("cnn_s", (1, 28, 28), 10)
        DPSGDTrainer(noise_multiplier=1.0, max_grad_norm=1.0, commit=lambda e: None).fit(
            model, torch.optim.SGD(model.parameters(), lr=0.05), x, y, batch_size=64, epochs=1)

    def raw() -> None:
        torch.manual_seed(0)
        model = build_model("cnn_s", (1, 28, 28), 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y), batch_size=64),
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
            for xb, yb in loader:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()

    t_ours, t_raw = [], []
    for rep in range(repeats):
        for name in (("ours", "raw") if rep % 2 == 0 else ("raw", "ours")):
            dt, _ = _timed(ours if name == "ours" else raw)
            (t_ours if name == "ours" else t_raw).append(dt)
    return statistics.median(t_ours) / statistics.median(t_raw), statistics.median(t_ours), statistics.median(t_raw)


#: Every measurement, run in order.
MEASUREMENTS: list[Callable[[Bench], list[Row]]] = [b1_ckks_vs_raw, b2_masking_vs_ckks, b3_fedmd_round]


# -- output ------------------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0 or (1e-3 <= abs(value) < 1e6):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:.2e}"


def markdown(rows: list[Row], command: str) -> str:
    lines = [
        "# Cost of the protections (B1, B2, B3)",
        "",
        f"Made by `{command}` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{platform.machine()} with {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, TenSEAL {ts.__version__}. Ratios are medians of timings "
        "alternated in one run.",
        "",
        "| measure | value | target | unit | met |",
        "|---|---:|---:|---|:---:|",
    ]
    for row in rows:
        target = "" if row.target is None else ("≤ " if row.better == "lower" else "≥ ") + _fmt(row.target)
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        lines.append(f"| {row.measure} | {_fmt(row.value)} | {target} | {row.unit} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 9")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per measurement (overrides --quick)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    parser.add_argument("--only", choices=[m.__name__.split("_")[0].upper() for m in MEASUREMENTS], default=None,
                        help="run one measurement only (e.g. B3), written to crypto_<name>.{json,md}")
    args = parser.parse_args(argv)
    measurements = [m for m in MEASUREMENTS if args.only is None or m.__name__.split("_")[0].upper() == args.only]

    repeats = args.repeats or (3 if args.quick else 9)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    bench = Bench(repeats=repeats)
    rows: list[Row] = []
    with tqdm(total=repeats * len(measurements), desc="crypto benchmarks", unit="rep", delay=2.0, file=sys.stderr) as bar:
        bench.progress = bar
        for measure in measurements:
            rows.extend(measure(bench))
    bench.progress = None

    command = (
        "python benchmarks/crypto.py"
        + (" --quick" if args.quick else "")
        + (f" --repeats {args.repeats}" if args.repeats else "")
        + (f" --only {args.only}" if args.only else "")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    payload = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(r).items()} for r in rows]
    # One measurement alone must not overwrite the full table.
    stem = "crypto" if args.only is None else f"crypto_{args.only.lower()}"
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(rows, command)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    missed = [r.measure for r in rows if r.met is False]
    if missed:
        print(f"targets missed: {missed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
