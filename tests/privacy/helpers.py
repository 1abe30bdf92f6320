"""Shared helpers for the privacy tests: building ledgers and forging them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefl.privacy.events import PrivacyEvent, PublicDataEvent
from securefl.privacy.ledger import Ledger, canonical_json, entry_hash, seal_message

DELTA = 1e-5


def key_from_seed(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed % 256]) * 32)


def dp_sgd(sigma: float = 1.5, q: float = 0.04, steps: int = 225) -> PrivacyEvent:
    return PrivacyEvent.dp_sgd(noise_multiplier=sigma, sample_rate=q, steps=steps)


def logits_event(sigma: float = 4.0, clip: float = 1.0) -> PrivacyEvent:
    return PrivacyEvent(
        unit="participant",
        mechanism="gaussian",
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        sensitivity=2 * clip,
        relation="replace_one",
        payload="logits",
    )


def ledger_path(run_dir: Path, participant: str) -> Path:
    return run_dir / "ledgers" / f"{participant}.jsonl"


def write_sealed_ledger(
    run_dir: Path,
    participant: str,
    key: Ed25519PrivateKey,
    *,
    accountant: str = "rdp",
    rounds: int = 3,
    max_epsilon: float = 8.0,
    seal: bool = True,
) -> Path:
    """A small, honest ledger: DP-SGD + logits per round, one public step, sealed."""
    path = ledger_path(run_dir, participant)
    with Ledger.open(
        path, participant=participant, max_epsilon=max_epsilon, delta=DELTA, signing_key=key, accountant=accountant
    ) as ledger:
        for r in range(rounds):
            ledger.commit(dp_sgd(), round=r)
            ledger.commit(logits_event(), round=r)
        ledger.commit(PublicDataEvent(payload="public_logits"), round=rounds)
        if seal:
            ledger.seal(key)
    return path


def read_entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_lines(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text("".join(canonical_json(e) + "\n" for e in entries), encoding="utf-8")


def rechain(entries: list[dict[str, Any]], key: Ed25519PrivateKey | None) -> list[dict[str, Any]]:
    """Recompute seq/prev_hash/hash, and re-sign seals with ``key`` if given.

    This is what a forger (or a buggy participant holding its own key) can do:
    the chain alone is keyless; only the seal signature binds it to a key.
    """
    out: list[dict[str, Any]] = []
    prev = "0" * 64
    for seq, entry in enumerate(entries):
        entry = dict(entry)
        entry["seq"] = seq
        entry["prev_hash"] = prev
        if entry["kind"] == "seal":
            entry["head"] = prev
            if key is not None:
                entry["signature"] = key.sign(seal_message(prev)).hex()
        entry["hash"] = entry_hash(entry)
        prev = entry["hash"]
        out.append(entry)
    return out
