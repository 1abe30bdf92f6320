"""Finding 6 of issue 19, played by the coordinator: HeteroFL's label split under DP.

In the reference, every client sends the set of classes present in its data with every uplink, in the clear and
outside the ledger (a class held by a single record exposes that record), and masks each record's loss to that set,
so removing a class's only record changes every other record's gradient and DP-SGD's per-record clipping no longer
bounds one record. Under any DP unit the set-up must be refused before round 1 unless every client uses every class
(``heterofl.label_split: all``), which is public and leaves each record's loss its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from securefl.config import parse_config
from securefl.core.party import DataView
from securefl.models.heterofl import masked_cross_entropy
from tests.adversary.wiretap import Wiretap, run_or_refusal
from tests.conftest import tiny_raw

HETEROFL = {"hidden_sizes": [8, 16], "local_epochs": 1, "batch_size": 32, "proportions": "a1-b1-c1", "norm": "gn"}
PRIVACY = {"record": {"unit": "record", "target_epsilon": 8.0},
           "participant": {"unit": "participant", "target_epsilon": 8.0, "clip_norm": 5.0}}


def _config(**changes):  # type: ignore[no-untyped-def]
    raw = tiny_raw(protocol="heterofl", run={"rounds": 1}, **changes)
    raw["data"]["partition"] = {"kind": "shards", "classes_per_party": 2}  # each client holds only some classes
    return parse_config(raw)


@pytest.mark.parametrize("unit", list(PRIVACY))
def test_the_coordinator_learns_no_clients_class_set_under_dp(tmp_path: Path, unit: str) -> None:
    config = _config(privacy=PRIVACY[unit], heterofl=HETEROFL)
    tap = Wiretap()
    fed, refusal = run_or_refusal(config, tmp_path / "run", tap)
    if fed is not None:
        truth = {p.id: sorted(torch.unique(p.train.y).tolist()) for p in fed.parties}
        # The attack: read the label split off each uplink.
        exposed = {m.sender: m.meta["label_split"] for m in tap.uplinks()
                   if m.meta.get("label_split") == truth[m.sender] and len(truth[m.sender]) < 10}
        assert not exposed, f"privacy.unit={unit}: the coordinator read the exact class sets {exposed}"
    assert refusal is not None and "heterofl.label_split" in refusal
    assert not (tmp_path / "run").exists()


def test_with_every_class_the_split_is_public_and_no_record_moves_another_records_gradient(tmp_path: Path) -> None:
    """``heterofl.label_split: all`` (the setting the refusal names) runs under DP-SGD; what the coordinator reads
    is the same for every client, and dropping one record leaves the others' losses unchanged."""
    config = _config(privacy=PRIVACY["record"], heterofl={**HETEROFL, "label_split": "all"})
    tap = Wiretap()
    fed, refusal = run_or_refusal(config, tmp_path / "run", tap)
    assert refusal is None and fed is not None
    assert {tuple(m.meta["label_split"]) for m in tap.uplinks()} == {tuple(range(10))}

    # Neighbouring data sets of p0: with and without the only record of a class it otherwise lacks.
    p0 = fed.parties[0]
    lone = int(next(i for i in range(len(fed.ctx.dataset.y_train)) if int(fed.ctx.dataset.y_train[i]) not in
                    set(p0.train.y.tolist())))
    without = p0
    with_it = dataclasses.replace(p0, train=DataView(p0.train.x_all, p0.train.y_all,
                                                     torch.cat([p0.train.idx, torch.tensor([lone])])))
    masks = [fed.protocol.label_split(party) for party in (without, with_it)]
    assert torch.equal(masks[0], masks[1])
    model = fed.protocol.submodel(fed.protocol.replica(p0), 1.0)
    x, y = p0.train.x[:1], p0.train.y[:1]
    grads = []
    for mask in masks:
        model.zero_grad()
        masked_cross_entropy(model(x), y, mask).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
