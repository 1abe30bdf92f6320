"""FedMD: the contract, plus behaviour the paper implies."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from securefl.config import load_config
from securefl.core.training import PlainTrainer, predict_logits
from securefl.protocols.fedmd import FedMD, digest_loss
from securefl.report import warm_start_note
from securefl.runtime.federation import Federation
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


def test_the_public_transfer_stage_takes_its_own_batch_size(tmp_path: Path) -> None:
    """A few-shot silo trains at a small batch; the 5,000-image public stage need not (it is not private)."""
    class BatchRecorder(RecordingTrainer):
        def fit(self, model, optimizer, x, y, **kwargs):  # type: ignore[no-untyped-def]
            self.calls.append(("private", kwargs["payload"], kwargs["batch_size"]))
            return PlainTrainer.fit(self, model, optimizer, x, y, **kwargs)

        def fit_public(self, model, optimizer, x, y, **kwargs):  # type: ignore[no-untyped-def]
            self.calls.append(("public", kwargs["payload"], kwargs["batch_size"]))
            return PlainTrainer.fit_public(self, model, optimizer, x, y, **kwargs)

    def batches(**fedmd: int) -> set[tuple[str, str, int]]:
        fed = Federation(tiny_config(data={"public_labelled": True}, training={"batch_size": 5},
                                     fedmd={"transfer_max_epochs": 1, **fedmd}), tmp_path / str(fedmd),
                         progress=False)
        party = fed.parties[0]
        party.trainer = BatchRecorder()
        fed.protocol.prepare_party(party)
        return set(party.trainer.calls)

    assert batches() == {("public", "transfer_public", 5), ("private", "transfer_private", 5)}
    assert batches(transfer_public_batch_size=64) == {("public", "transfer_public", 64),
                                                      ("private", "transfer_private", 5)}


def test_fedmd_beats_local_only_on_the_demo(tmp_path: Path) -> None:
    """The demo's claim, seeded: collaboration through logits lifts the non-IID silos."""
    results = {}
    for name in ("fedmd", "local_only"):
        config = load_config(ROOT / "examples" / "digits_fedmd.yaml", [f"protocol={name}"])
        results[name] = Federation(config, tmp_path / name, progress=False).run()["mean_accuracy"]
    assert results["fedmd"] > results["local_only"] + 0.02, results


# ----- the kl digest (Hinton distillation) --------------------------------------------------------
def test_kl_digest_is_t_squared_kl_of_the_softened_consensus_to_the_softened_student() -> None:
    torch.manual_seed(0)
    z, consensus, t = 3 * torch.randn(6, 4), 3 * torch.randn(6, 4), 2.5
    got = digest_loss("kl", t)(torch.nn.Identity(), z, consensus)
    p, q = F.softmax(consensus / t, dim=1), F.softmax(z / t, dim=1)  # teacher (consensus), student
    expected = t**2 * (p * (p.log() - q.log())).sum(dim=1).mean()
    torch.testing.assert_close(got, expected)
    reverse = t**2 * (q * (q.log() - p.log())).sum(dim=1).mean()
    assert abs(float(expected - reverse)) > 0.05  # the test tells KL(p || q) from KL(q || p)


def test_kl_digest_pulls_the_softened_posteriors_toward_the_consensus(tmp_path: Path) -> None:
    t = 2.0
    fed = _prepared(tmp_path, fedmd={"revisit_epochs": 0, "digest_epochs": 5, "digest_loss": "kl",
                                     "digest_temperature": t})
    proto = fed.protocol
    replies = [proto.client_step(p, [], 1) for p in fed.parties]
    down = proto.server_step(1, replies, fed.aggregator)
    target = F.softmax(down.tensor("consensus") / t, dim=1)
    x_align = fed.ctx.public.x[proto.alignment_indices(1)]

    def gap(party) -> float:  # type: ignore[no-untyped-def]
        log_q = F.log_softmax(predict_logits(party.model, x_align) / t, dim=1)
        return float(F.kl_div(log_q, target, reduction="batchmean"))

    for party in fed.parties:
        before = gap(party)
        proto.client_update(party, [down], 1)
        after = gap(party)
        assert after < 0.8 * before, (party.id, before, after)


# ----- what the report states ---------------------------------------------------------------------
def test_run_notes_state_the_digest_loss_and_the_digest_and_revisit_steps(tmp_path: Path) -> None:
    fed = Federation(tiny_config(fedmd={"digest_loss": "kl", "digest_temperature": 2, "digest_epochs": 3,
                                        "revisit_epochs": 2, "revisit_batch_size": 16}), tmp_path / "run",
                     progress=False)
    notes = fed.protocol.run_notes()
    assert notes["digest loss"] == "kl at temperature T = 2"
    revisit = [math.ceil(len(p.train) / 16) * 2 for p in fed.ctx.split.parties]
    assert len(set(revisit)) > 1  # Dirichlet silos: the note must give the spread
    # 100 alignment points at batch 256: one step per digest epoch.
    assert notes["optimizer steps per round"] == (
        f"digest 3 (batch 256, 3 epoch(s)); revisit mean {sum(revisit) / 3:.1f}, per participant "
        f"{min(revisit)}-{max(revisit)} (batch 16, 2 epoch(s))")
    l1 = Federation(tiny_config(), tmp_path / "l1", progress=False).protocol.run_notes()
    assert l1["digest loss"] == "l1"


def test_transfer_learning_is_fedmds_own_warm_start(tmp_path: Path) -> None:
    config = tiny_config(training={"warm_start": True})
    fed = Federation(config, tmp_path / "run", progress=False)
    assert FedMD.has_own_warm_start and not fed.protocol.warm_starts()
    assert warm_start_note(config, fed.protocol) == {"warm start": "fedmd's own step 0 (an early-stopped local fit)"}
