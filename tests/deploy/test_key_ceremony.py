"""The key ceremony across machines: every party makes its own keys, and only public cards and sealed envelopes
travel. A CKKS run over the result works, and no secret ever sits outside its owner's directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from securefl.cli import main
from securefl.config import parse_config
from securefl.crypto.envelope import EnvelopeError, open_envelope
from securefl.crypto.keystore import load_roster
from securefl.deploy.ceremony import (
    CeremonyError,
    PublicCard,
    _load_or_create_transport_key,
    create_committee,
    create_party,
    install_public_context,
    join_committee,
    trust_card,
)
from securefl.deploy.node import ParticipantNode, settings_from_config
from securefl.deploy.remote import RemoteParticipants, local_exchange
from securefl.runtime.federation import Federation

from .test_nodes import healthcare_raw


def ceremony(config_file: Path, ids: list[str], root: Path) -> dict[str, Path]:
    """Every step of the ceremony through the command line, each party in its own directory; ``root/mail`` is
    everything that crossed between machines. Returns each party's machine directory."""
    machines = {pid: root / "sites" / pid for pid in ids} | {"aggregator": root / "coordinator"}
    mail = root / "mail"
    mail.mkdir()
    for pid, machine in machines.items():
        assert main(["keys", "create", pid, "--key-dir", str(machine / "keys")]) == 0
        shutil.copy(machine / "keys" / f"{pid}.card", mail)
    # What each owner reads out by phone: the fingerprint of its card, from its own machine.
    heard = {pid: PublicCard.from_bytes((machine / "keys" / f"{pid}.card").read_bytes()).fingerprint
             for pid, machine in machines.items()}
    for pid, machine in machines.items():
        others = [other for other in machines if other != pid]
        fingerprints = [arg for other in others for arg in ("--fingerprint", heard[other])]
        assert main(["keys", "trust", *[str(mail / f"{other}.card") for other in others], *fingerprints,
                     "--key-dir", str(machine / "keys")]) == 0
    first, *rest = ids
    assert main(["keys", "committee-create", str(config_file), "--id", first,
                 "--key-dir", str(machines[first] / "keys"), "--out", str(mail)]) == 0
    for pid in rest:
        assert main(["keys", "committee-join", str(config_file), str(mail / f"ckks_committee.for-{pid}.envelope"),
                     "--id", pid, "--key-dir", str(machines[pid] / "keys")]) == 0
    assert main(["keys", "install-context", str(config_file), str(mail / "ckks_public.context"),
                 "--key-dir", str(machines["aggregator"] / "keys")]) == 0
    return machines


def test_a_ckks_run_over_keys_made_on_each_machine_and_no_secret_leaves_home(
        hospital_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = healthcare_raw(hospital_data)
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    ids = [p.id for p in config.participants]
    machines = ceremony(config_file, ids, tmp_path)
    assert "fingerprint" in capsys.readouterr().out

    # Secrets stay home: each private key only in its party's directory, the committee key only at the owners.
    for pid, machine in machines.items():
        for suffix in (".ed25519", ".x25519"):
            assert [p.parent.parent for p in tmp_path.rglob(f"{pid}{suffix}")] == [machine]
    assert sorted(p.parent.parent.name for p in tmp_path.rglob("ckks_committee.secret")) == sorted(ids)
    assert len({(machines[pid] / "keys" / "ckks_committee.secret").read_bytes() for pid in ids}) == 1
    assert sorted(p.suffix for p in (tmp_path / "mail").iterdir()) == [".card"] * 5 + [".context"] + [".envelope"] * 3

    # What travelled through the coordinator is useless to it: it cannot open an envelope with its own key.
    coordinator_transport = _load_or_create_transport_key(machines["aggregator"] / "keys", "aggregator")
    with pytest.raises(EnvelopeError, match="addressed to 'hospital_b'"):
        open_envelope((tmp_path / "mail" / "ckks_committee.for-hospital_b.envelope").read_bytes(),
                      purpose="ckks-committee-secret", recipient_id="aggregator", recipient_key=coordinator_transport,
                      trusted_senders=load_roster(machines["aggregator"] / "keys", ids))
    with pytest.raises(EnvelopeError, match="does not open"):
        open_envelope((tmp_path / "mail" / "ckks_committee.for-hospital_b.envelope").read_bytes(),
                      purpose="ckks-committee-secret", recipient_id="hospital_b", recipient_key=coordinator_transport,
                      trusted_senders=load_roster(machines["aggregator"] / "keys", ids))

    nodes = {p.id: ParticipantNode(machines[p.id], p.id, policy_file=p.policy_file, **settings_from_config(config, p.id))
             for p in config.participants}
    remote = RemoteParticipants(local_exchange(nodes), ids)
    summary = Federation(config, machines["aggregator"], progress=False, remote=remote).run()
    assert summary["rounds"] == 2 and all(p["epsilon"] <= p["target_epsilon"] for p in summary["participants"])
    # A privacy officer pins each ledger to the key its owner read out, from the coordinator's roster.
    for pid in ids:
        assert main(["audit", str(machines[pid]), "--roster", str(machines["aggregator"] / "keys")]) == 0


@pytest.fixture
def parties(tmp_path: Path) -> dict[str, Path]:
    dirs = {pid: tmp_path / pid / "keys" for pid in ("h1", "h2", "h3", "aggregator")}
    for pid, key_dir in dirs.items():
        create_party(key_dir, pid)
    return dirs


def card(dirs: dict[str, Path], pid: str) -> bytes:
    return (dirs[pid] / f"{pid}.card").read_bytes()


def heard(dirs: dict[str, Path], pid: str) -> str:
    """The fingerprint ``pid``'s owner reads out by phone, from its own card."""
    return PublicCard.from_bytes(card(dirs, pid)).fingerprint


def test_create_keeps_existing_keys(parties: dict[str, Path]) -> None:
    before = card(parties, "h1")
    again, _ = create_party(parties["h1"], "h1")
    assert PublicCard.from_bytes(before).signing_key == again.signing_key
    assert PublicCard.from_bytes(before).transport_key == again.transport_key


def test_trust_refuses_a_substituted_key_an_altered_card_and_a_private_key(parties: dict[str, Path], tmp_path: Path) -> None:
    trust_card(parties["h2"], card(parties, "h1"), expected_fingerprint=heard(parties, "h1"))
    impostor = tmp_path / "impostor" / "keys"
    impostor_card = create_party(impostor, "h1")[0]  # someone else claims to be h1
    with pytest.raises(CeremonyError, match="not the .* its owner read out"):
        trust_card(parties["h2"], impostor_card.to_bytes(), expected_fingerprint=heard(parties, "h1"))
    # Even if the impostor's own fingerprint were read out, the roster keeps the key it already trusts for h1.
    with pytest.raises(CeremonyError, match="already trusts another key for 'h1'.*key-substitution"):
        trust_card(parties["h2"], impostor_card.to_bytes(), expected_fingerprint=impostor_card.fingerprint)
    assert (parties["h2"] / "roster" / "h1.pub").read_bytes() == PublicCard.from_bytes(card(parties, "h1")).signing_key

    # A relay swaps the transport key on h3's card for its own, to read h3's envelope: the card's signature fails.
    genuine = PublicCard.from_bytes(card(parties, "h3"))
    swapped = PublicCard("h3", genuine.signing_key, PublicCard.from_bytes(card(parties, "aggregator")).transport_key,
                         genuine.signature)
    with pytest.raises(CeremonyError, match="signature does not verify"):
        trust_card(parties["h2"], swapped.to_bytes(), expected_fingerprint=genuine.fingerprint)
    with pytest.raises(CeremonyError, match="private key, not a public card"):
        trust_card(parties["h2"], (parties["h3"] / "h3.ed25519").read_bytes(), expected_fingerprint=genuine.fingerprint)
    with pytest.raises(CeremonyError, match="bare 32-byte key"):
        trust_card(parties["h2"], (parties["h3"] / "h3.x25519").read_bytes(), expected_fingerprint=genuine.fingerprint)
    with pytest.raises(CeremonyError, match="not a securefl public card"):
        trust_card(parties["h2"], b'{"party": "h3"}', expected_fingerprint=genuine.fingerprint)
    assert not (parties["h2"] / "roster" / "h3.pub").exists()
    # A card (validly self-signed) whose id is a path must not write outside the roster.
    from securefl.crypto.signing import generate_signing_key, public_key_bytes

    key = generate_signing_key()
    unsigned = PublicCard("../../escape", public_key_bytes(key), genuine.transport_key, b"")
    escaping = PublicCard(unsigned.party_id, unsigned.signing_key, unsigned.transport_key, key.sign(unsigned.signed_bytes()))
    with pytest.raises(CeremonyError, match="party id '../../escape' must be"):
        trust_card(parties["h2"], escaping.to_bytes(), expected_fingerprint=escaping.fingerprint)
    assert not list(tmp_path.rglob("escape*"))
    with pytest.raises(CeremonyError, match="party id 'a/b' must be"):
        create_party(tmp_path / "x", "a/b")


def ckks_config(ids: list[str]):  # type: ignore[no-untyped-def]
    return parse_config({"protocol": "fedmd", "secure_aggregation": "ckks", "data": {"dataset": "digits"},
                         "participants": [{"id": pid, "model": "mlp_s"} for pid in ids]})


def trust_everyone(parties: dict[str, Path]) -> None:
    for pid, key_dir in parties.items():
        for other in parties:
            if other != pid:
                trust_card(key_dir, card(parties, other), expected_fingerprint=heard(parties, other))


def test_the_committee_key_reaches_only_owners_and_only_from_an_owner(parties: dict[str, Path], tmp_path: Path) -> None:
    config = ckks_config(["h1", "h2", "h3"])
    with pytest.raises(CeremonyError, match="no transport key for 'h2'"):
        create_committee(config, parties["h1"], "h1", tmp_path / "out")
    trust_everyone(parties)
    with pytest.raises(CeremonyError, match="only data owners hold the committee key"):
        create_committee(config, parties["aggregator"], "aggregator", tmp_path / "out")
    create_committee(config, parties["h1"], "h1", tmp_path / "out")
    envelope = (tmp_path / "out" / "ckks_committee.for-h2.envelope").read_bytes()
    with pytest.raises(CeremonyError, match="addressed to 'h2', not 'h3'"):
        join_committee(config, parties["h3"], "h3", envelope)
    flipped = bytearray(envelope)
    flipped[-100] ^= 1
    with pytest.raises(CeremonyError, match="bad signature"):
        join_committee(config, parties["h2"], "h2", bytes(flipped))
    assert join_committee(config, parties["h2"], "h2", envelope) == "h1"
    assert (parties["h2"] / "ckks_committee.secret").read_bytes() == (parties["h1"] / "ckks_committee.secret").read_bytes()

    # The coordinator makes a committee key of its own (which it could decrypt with) and seals it for h3
    # correctly: h3 refuses it, because the coordinator is not a data owner.
    from securefl.crypto.ckks import KeyHolderContext
    from securefl.crypto.envelope import seal_envelope
    from securefl.crypto.keystore import load_or_create_party_keys
    from securefl.deploy.ceremony import COMMITTEE_PURPOSE, _transport_key

    own_key = KeyHolderContext.generate(config.ckks).export_secret_for_committee()
    sealed = seal_envelope(own_key, purpose=COMMITTEE_PURPOSE, sender_id="aggregator",
                           sender_key=load_or_create_party_keys(parties["aggregator"], "aggregator").private_key,
                           recipient_id="h3", recipient_key=_transport_key(parties["aggregator"], "h3"))
    with pytest.raises(CeremonyError, match="sender 'aggregator' is not one of the trusted senders"):
        join_committee(config, parties["h3"], "h3", sealed)
    assert not (parties["h3"] / "ckks_committee.secret").exists()

    # Two owners who each made a committee key: the second join is refused rather than overwriting the first.
    create_committee(config, parties["h3"], "h3", tmp_path / "out3")
    with pytest.raises(CeremonyError, match="already holds another committee key"):
        join_committee(config, parties["h3"], "h3", (tmp_path / "out" / "ckks_committee.for-h3.envelope").read_bytes())
    (parties["h3"] / "ckks_committee.secret").write_bytes(b"SFSK damaged")
    with pytest.raises(CeremonyError, match="not a readable CKKS committee key"):
        create_committee(config, parties["h3"], "h3", tmp_path / "out3")


def test_the_coordinator_refuses_a_context_that_could_decrypt(parties: dict[str, Path], tmp_path: Path) -> None:
    config = ckks_config(["h1", "h2"])
    trust_everyone({k: v for k, v in parties.items() if k in ("h1", "h2")})
    create_committee(config, parties["h1"], "h1", tmp_path / "out")
    with pytest.raises(CeremonyError, match="never hold the committee's secret key"):
        install_public_context(config, parties["aggregator"], (parties["h1"] / "ckks_committee.secret").read_bytes())
    path = install_public_context(config, parties["aggregator"], (tmp_path / "out" / "ckks_public.context").read_bytes())
    assert path == parties["aggregator"] / "ckks_public.context"
    other_params = parse_config({**config.model_dump(mode="json"), "ckks": {"poly_modulus_degree": 16384,
                                                                           "coeff_mod_bit_sizes": [60, 40, 40, 60]}})
    with pytest.raises(CeremonyError, match="other CKKS parameters"):
        install_public_context(other_params, parties["aggregator"], path.read_bytes())


def test_provision_runs_the_same_ceremony_and_refuses_a_new_key_for_a_trusted_party(tmp_path: Path) -> None:
    """provision is every party's step on one machine: a second coordinator with a fresh key is a key
    substitution for the nodes that trust the first, and is refused, not written over their rosters."""
    from securefl.deploy.provision import provision

    config = ckks_config(["h1", "h2"])
    nodes = {pid: tmp_path / pid for pid in ("h1", "h2")}
    provision(config, coordinator_dir=tmp_path / "c1", node_dirs=nodes)
    secret = (nodes["h2"] / "keys" / "ckks_committee.secret").read_bytes()
    assert secret == (nodes["h1"] / "keys" / "ckks_committee.secret").read_bytes()
    assert not (tmp_path / "c1" / "keys" / "ckks_committee.secret").exists()
    provision(config, coordinator_dir=tmp_path / "c1", node_dirs=nodes)  # a re-run keeps every key
    assert (nodes["h2"] / "keys" / "ckks_committee.secret").read_bytes() == secret
    with pytest.raises(CeremonyError, match="already trusts another key for 'aggregator'"):
        provision(config, coordinator_dir=tmp_path / "c2", node_dirs=nodes)
