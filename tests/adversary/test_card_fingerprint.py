"""Finding 11, as the coordinator: swap a data owner's card on its way, and open that owner's CKKS envelope.

The cards of a key ceremony travel through the coordinator. It makes its own keys under the id ``h2`` and hands
that card to ``h1`` in place of ``h2``'s. If ``h1`` trusts it, ``h1`` seals the CKKS committee secret for the
coordinator's transport key, and the coordinator opens it: it can then decrypt every owner's ciphertext. A card's
own signature cannot stop this (the coordinator signed its card with its own key); only the fingerprint that
``h2``'s owner reads out by phone can. ``securefl keys trust`` must refuse a card without that fingerprint, and a
card whose fingerprint differs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from securefl.cli import main
from securefl.crypto.envelope import open_envelope
from securefl.deploy.ceremony import COMMITTEE_PURPOSE, PublicCard, _load_or_create_transport_key, create_party


def test_a_swapped_card_is_refused_and_the_coordinator_opens_no_envelope(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({"protocol": "fedmd", "secure_aggregation": "ckks", "data": {"dataset": "digits"},
                                      "participants": [{"id": pid, "model": "mlp_s"} for pid in ("h1", "h2")]}))
    h1, h2, mail = tmp_path / "h1" / "keys", tmp_path / "h2" / "keys", tmp_path / "mail"
    mail.mkdir()
    assert main(["keys", "create", "h1", "--key-dir", str(h1)]) == 0
    assert main(["keys", "create", "h2", "--key-dir", str(h2)]) == 0
    genuine_fingerprint = PublicCard.from_bytes((h2 / "h2.card").read_bytes()).fingerprint  # read out by phone
    capsys.readouterr()

    # The coordinator relays the cards, and puts its own, made under the id h2, in place of h2's.
    attacker = tmp_path / "coordinator" / "keys"
    swapped, swapped_path = create_party(attacker, "h2")
    shutil.copy(swapped_path, mail / "h2.card")
    assert swapped.fingerprint != genuine_fingerprint

    # h1 trusts the card it received: with no fingerprint, as the old docs allowed ...
    assert main(["keys", "trust", str(mail / "h2.card"), "--key-dir", str(h1)]) != 0, \
        "a card was trusted without its owner's fingerprint"
    assert "--fingerprint" in capsys.readouterr().err
    # ... or with the fingerprint h2's owner read out on the phone, which the swapped card does not match.
    assert main(["keys", "trust", str(mail / "h2.card"), "--fingerprint", genuine_fingerprint,
                 "--key-dir", str(h1)]) != 0, "a card whose fingerprint differs from the one read out was trusted"
    assert "its owner read out" in capsys.readouterr().err
    assert not (h1 / "roster" / "h2.pub").exists()

    # So h1 seals nothing for the coordinator's key: it has no transport key for h2 at all.
    status = main(["keys", "committee-create", str(config), "--id", "h1", "--key-dir", str(h1),
                   "--out", str(mail)])
    envelope = mail / "ckks_committee.for-h2.envelope"
    if envelope.exists():  # the attack went through: the coordinator opens the committee secret
        sender, secret = open_envelope(envelope.read_bytes(), purpose=COMMITTEE_PURPOSE, recipient_id="h2",
                                       recipient_key=_load_or_create_transport_key(attacker, "h2"),
                                       trusted_senders={"h1": _h1_key(h1)})
        pytest.fail(f"the coordinator opened {sender!r}'s committee secret ({len(secret)} bytes)")
    assert status == 2
    assert "no transport key for 'h2'" in capsys.readouterr().err

    # With the genuine card and the fingerprint read out, the ceremony goes on.
    assert main(["keys", "trust", str(h2 / "h2.card"), "--fingerprint", genuine_fingerprint.upper(),
                 "--key-dir", str(h1)]) == 0


def _h1_key(key_dir: Path):  # type: ignore[no-untyped-def]
    from securefl.crypto.signing import load_public_key

    return load_public_key(PublicCard.from_bytes((key_dir / "h1.card").read_bytes()).signing_key)
