"""FedMD: the contract, plus behaviour the paper implies."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from securefl.config import load_config
from securefl.runtime.federation import Federation
from securefl.runtime.training import PlainTrainer, predict_logits
from tests.conftest import tiny_config
from tests.protocols.contract import ProtocolContract

ROOT = Path(__file__).resolve().parents[2]


class TestFedMDContract(ProtocolContract):
    protocol = "fedmd"


def _prepared(tmp_path: Path, **changes) -> Federation:  # type: ignore[no-untyped-def]
    fed = Federation(tiny_config(**changes), tmp_path / "run", progress=False)
    for party in fed.parties:
        fed.protocol.prepare_party(party)
    return fed


def test_consensus_is_the_unweighted_mean_of_the_logits(tmp_path: Path) -> None:
    fed = _prepared(tmp_path)
    replies = [fed.protocol.client_step(p, [], 1) for p in fed.parties]
    down = fed.protocol.server_step(1, replies, fed.aggregator)
    by_hand = sum(r.tensor("logits") for r in replies) / len(replies)
    torch.testing.assert_close(down.tensor("consensus"), by_hand)


def test_digest_lowers_the_l1_gap_to_the_consensus(tmp_path: Path) -> None:
    fed = _prepared(tmp_path, fedmd={"revisit_epochs": 0, "digest_epochs": 5})
    proto = fed.protocol
    replies = [proto.client_step(p, [], 1) for p in fed.parties]
    down = proto.server_step(1, replies, fed.aggregator)
    consensus = down.tensor("consensus")
    x_align = fed.ctx.public.x[proto.alignment_indices(1)]
    for party in fed.parties:
        before = F.l1_loss(predict_logits(party.model, x_align), consensus)
        proto.client_update(party, [down], 1)
        after = F.l1_loss(predict_logits(party.model, x_align), consensus)
        assert after < 0.9 * before, (party.id, float(before), float(after))


def test_alignment_subset_is_shared_by_everyone_and_fresh_each_round(tmp_path: Path) -> None:
    fed = _prepared(tmp_path)
    a1, a1_again, a2 = (fed.protocol.alignment_indices(r) for r in (1, 1, 2))
    assert torch.equal(a1, a1_again)
    assert not torch.equal(a1, a2)
    assert len(a1) == 100 and len(set(a1.tolist())) == 100


def test_labelled_public_set_alignment_is_stratified(tmp_path: Path) -> None:
    fed = _prepared(tmp_path, data={"public_labelled": True}, fedmd={"alignment_size": 50})
    labels = fed.ctx.public.y[fed.protocol.alignment_indices(4)]
    counts = torch.bincount(labels, minlength=10).float()
    public_share = torch.bincount(fed.ctx.public.y, minlength=10).float() / len(fed.ctx.public)
    # Each class gets its public-set share of the 50 draws, up to rounding.
    assert (counts - 50 * public_share).abs().max() < 1


class RecordingTrainer(PlainTrainer):
    """Trains for real, and records which data each step touched."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def fit(self, model, optimizer, x, y, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(("private", kwargs["payload"], len(x)))
        return super().fit(model, optimizer, x, y, **kwargs)

    def fit_public(self, model, optimizer, x, y, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(("public", kwargs["payload"], len(x)))
        return super().fit_public(model, optimizer, x, y, **kwargs)


def test_digest_on_public_data_comes_before_revisit_on_private_data(tmp_path: Path) -> None:
    fed = _prepared(tmp_path)
    party = fed.parties[0]
    party.trainer = RecordingTrainer()
    replies = [fed.protocol.client_step(p, [], 1) for p in fed.parties]
    fed.protocol.client_update(party, [fed.protocol.server_step(1, replies, fed.aggregator)], 1)
    assert party.trainer.calls == [("public", "digest", 100), ("private", "revisit", party.num_samples)]


def test_optimizer_state_persists_across_rounds(tmp_path: Path) -> None:
    fed = Federation(tiny_config(run={"rounds": 2}), tmp_path / "run", progress=False)
    opt = fed.parties[0].state["digest_opt"]
    fed.run()
    assert fed.parties[0].state["digest_opt"] is opt
    steps = [s["step"] for s in opt.state.values()]
    # Two rounds of one digest epoch over 100 alignment points at batch 256 -> 2 Adam steps, never reset.
    assert steps and all(float(s) == 2 for s in steps)


def test_transfer_learning_uses_a_labelled_public_set(tmp_path: Path) -> None:
    def public_steps(labelled: bool) -> list[tuple[str, str, int]]:
        fed = Federation(tiny_config(data={"public_labelled": labelled}), tmp_path / str(labelled), progress=False)
        party = fed.parties[0]
        party.trainer = RecordingTrainer()
        fed.protocol.prepare_party(party)
        return party.trainer.calls

    labelled = public_steps(True)
    # Public stage first (150 public records minus a 10% validation split), then the private stage.
    assert labelled[0] == ("public", "transfer_public", 135)
    assert labelled[-1][:2] == ("private", "transfer_private")
    # A1: an unlabelled public set serves only as alignment inputs, never for training.
    assert all(kind == "private" for kind, _, _ in public_steps(False))


def test_fedmd_beats_local_only_on_the_demo(tmp_path: Path) -> None:
    """The demo's claim, seeded: collaboration through logits lifts the non-IID silos."""
    results = {}
    for name in ("fedmd", "local_only"):
        config = load_config(ROOT / "examples" / "digits_fedmd.yaml", [f"protocol={name}"])
        results[name] = Federation(config, tmp_path / name, progress=False).run()["mean_accuracy"]
    assert results["fedmd"] > results["local_only"] + 0.02, results
