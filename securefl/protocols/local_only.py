"""Local-only baseline: every participant trains alone on its own silo.

No paper: the lower bound every collaborative protocol must beat. It runs the same step 0 as FedMD
without a labelled public set (train on D_k with early stopping on the validation split), then
keeps training for ``local_epochs`` per round, keeping the weights with the best validation
accuracy, so the comparison gives local training the same number of rounds and the same model
selection rule as the protocols it is compared with. Nothing is ever sent. Page:
``docs/algorithms/local-only.md``.

Step                                                   here
build the participant's own model                      ``setup_party``
step 0: train on D_k, early-stopped on validation      ``prepare_party`` (``max_epochs_first``)
each round: ``local_epochs`` more, best weights kept   ``client_step`` (returns no message)
what the DP plan books                                 ``private_training_plan``
evaluation: its own model, and reweighted to its       ``evaluate``
own label shares (``own_distribution_accuracy``)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from pydantic import Field as PydField

from securefl.core.message import Message
from securefl.core.party import Party
from securefl.core.training import argmax_accuracy, fit_with_early_stopping, own_distribution_from_logits, predict_logits
from securefl.protocols.base import Protocol, ProtocolConfig, val_score


class LocalOnlyConfig(ProtocolConfig):
    max_epochs_first: int = PydField(50, ge=1, description="epochs cap of the initial early-stopped training")
    patience: int = PydField(5, ge=1)


class LocalOnly(Protocol):
    name = "local_only"
    summary = "baseline: each participant trains alone (lower bound)"
    Config = LocalOnlyConfig
    config: LocalOnlyConfig
    # Its first fit (prepare_party) is the warm start every other protocol may be given.
    has_own_warm_start = True
    # Reads the owner's label shares, which no DP mechanism protects (docs/metrics.md).
    owner_only_metrics = frozenset({"own_distribution_accuracy"})

    def setup_party(self, party: Party) -> None:
        party.model = self.ctx.build_model(party.model_name, purpose=party.id)
        party.state["private_opt"] = self.ctx.make_optimizer(party.model, lr=party.lr)
        party.state["best_val"] = -float("inf")
        party.state["best_model"] = None

    def prepare_party(self, party: Party) -> None:
        model = party.model
        assert model is not None
        _, best = fit_with_early_stopping(
            lambda: self._train(party, epochs=1), model,
            party.trainer.validation(lambda: val_score(party, self.ctx.eval_classes)),
            max_epochs=self.config.max_epochs_first, patience=self.config.patience)
        party.state["best_val"] = best
        party.state["best_model"] = copy.deepcopy(model.state_dict())

    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> None:
        model = party.model
        assert model is not None
        self._train(party, epochs=self.ctx.training.local_epochs)
        score = party.trainer.validation(lambda: val_score(party, self.ctx.eval_classes))
        if score is None:
            return None  # this participant's trainer allows no selection on validation records: keep the latest
        acc = score()
        if acc > party.state["best_val"]:
            party.state["best_val"] = acc
            party.state["best_model"] = copy.deepcopy(model.state_dict())
        else:
            # Keep the validation-selected weights: more local epochs on a small silo only overfit.
            model.load_state_dict(party.state["best_model"])
        return None

    def evaluate(self, party: Party) -> dict[str, float]:
        """``accuracy`` on the test set; ``own_distribution_accuracy`` reweighted to the owner's label shares, the
        yardstick of a personalised model (FML's local one)."""
        assert party.model is not None
        y, classes = self.ctx.test_y, self.ctx.eval_classes
        logits = predict_logits(party.model, self.ctx.test_x)  # once for both scores
        counts = party.train.label_counts(self.ctx.num_classes)
        return {"accuracy": argmax_accuracy(logits, y, classes),
                "own_distribution_accuracy": own_distribution_from_logits(logits, y, counts, classes)}

    def private_training_plan(self, party: Party) -> list[tuple[int, int | None, int | None]]:
        t = self.ctx.training
        return [(t.batch_size, self.config.max_epochs_first + self.ctx.rounds * t.local_epochs, None)]

    def _train(self, party: Party, *, epochs: int) -> None:
        assert party.model is not None
        party.trainer.fit(party.model, party.state["private_opt"], party.train.x, party.train.y,
                          batch_size=self.ctx.training.batch_size, epochs=epochs,
                          max_grad_norm=self.ctx.training.max_grad_norm, payload="local_training")
