"""ε can never be reset: one accountant per ledger, and no accountant anywhere else.

A new accountant per round silently resets ε (a well-known bug in other FL
libraries). These tests pin the three defences: re-opening restores the same
ε, a ledger constructs exactly one accountant and exposes no way to replace
it, and no module of securefl outside the allowed ones constructs an accountant.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import securefl
import securefl.privacy.ledger.ledger as ledger_module
from securefl.privacy.ledger import Ledger

from .helpers import DELTA, dp_sgd, logits_event

SECUREFL = Path(securefl.__file__).resolve().parent

#: The only modules allowed to construct an accountant.
ALLOWED = {
    "privacy/accountants.py",  # the registry itself
    "privacy/ledger/ledger.py",  # one per participant, for the whole run
    "privacy/calibration.py",  # before round 1, same accountant as reporting
    "privacy/audit.py",  # after the run, from the ledger file
}
#: Constructors of accountants: ours, Opacus's and dp-accounting's.
CONSTRUCTORS = {
    "RdpAccountant",
    "PldAccountant",
    "PrvAccountant",
    "get_accountant",
    "RDPAccountant",
    "PRVAccountant",
    "GaussianAccountant",
    "create_accountant",
    "PLDAccountant",
}


def accountant_constructions(source: str) -> list[tuple[int, str]]:
    """Calls that construct an accountant, including through an ``import ... as`` alias."""
    tree = ast.parse(source)
    names = set(CONSTRUCTORS)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                base = alias.name.rsplit(".", 1)[-1]
                if base in CONSTRUCTORS and alias.asname:
                    names.add(alias.asname)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in names:
                found.append((node.lineno, name))
    return found


def test_scanner_catches_constructions() -> None:
    # The scanner itself must work, or the next test proves nothing.
    code = (
        "from opacus.accountants import RDPAccountant as R\n"
        "import securefl.privacy.accountants as acc\n"
        "a = R()\n"
        "b = acc.get_accountant('rdp')\n"
        "c = PLDAccountant()\n"
    )
    assert [name for _, name in accountant_constructions(code)] == ["R", "get_accountant", "PLDAccountant"]
    assert accountant_constructions("x = ledger.epsilon()\n") == []


def test_no_accountant_is_constructed_outside_the_allowed_modules() -> None:
    violations = []
    for path in sorted(SECUREFL.rglob("*.py")):
        rel = path.relative_to(SECUREFL).as_posix()
        if rel in ALLOWED:
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        try:
            calls = accountant_constructions(source)
        except SyntaxError as exc:
            pytest.fail(f"securefl/{rel} does not parse, so it cannot be checked: {exc}")
        violations += [f"securefl/{rel}:{line}: {name}(...)" for line, name in calls]
    assert not violations, (
        "accountants may only be constructed by the ledger, calibration and audit "
        "(a per-round accountant silently resets ε):\n" + "\n".join(violations)
    )


def test_a_ledger_constructs_exactly_one_accountant(tmp_path: Path, key: Ed25519PrivateKey, monkeypatch) -> None:
    made = []
    real = ledger_module.get_accountant

    def counting(name: str):  # type: ignore[no-untyped-def]
        made.append(name)
        return real(name)

    monkeypatch.setattr(ledger_module, "get_accountant", counting)
    with Ledger.open(tmp_path / "h1.jsonl", participant="h1", max_epsilon=20.0, delta=DELTA, signing_key=key) as lg:
        first = lg._accountant
        for r in range(5):
            lg.would_exceed(dp_sgd())
            lg.commit(dp_sgd(), round=r)
            lg.commit(logits_event(), round=r)
            lg.epsilon(), lg.epsilon("participant"), lg.remaining(), lg.epsilon_by_unit()
        lg.seal(key)
        assert lg._accountant is first
    assert made == ["rdp"]


def test_no_public_way_to_reset_or_replace_the_accountant(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    public = {name for name in dir(Ledger) if not name.startswith("_")}
    forbidden_words = ("reset", "clear", "restart", "new_accountant", "set_accountant", "truncate", "rewind")
    assert not [n for n in public if any(w in n for w in forbidden_words)]
    assert "accountant" not in public
    with Ledger.open(tmp_path / "h1.jsonl", participant="h1", max_epsilon=8.0, delta=DELTA, signing_key=key) as lg:
        with pytest.raises(AttributeError):
            lg.accountant_name = "pld"  # type: ignore[misc]
        with pytest.raises(AttributeError):
            lg.events = ()  # type: ignore[misc]
        lg.commit(dp_sgd(), round=0)
        # `events` is a tuple: there is nothing to mutate that could touch the ledger.
        assert isinstance(lg.events, tuple)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_reopening_reports_the_same_epsilon(tmp_path: Path, key: Ed25519PrivateKey, accountant: str) -> None:
    path = tmp_path / "h1.jsonl"
    params = dict(participant="h1", max_epsilon=20.0, delta=DELTA, signing_key=key, accountant=accountant)
    with Ledger.open(path, **params) as lg:
        for r in range(3):
            lg.commit(dp_sgd(), round=r)
            lg.commit(logits_event(), round=r)
        before = lg.epsilon_by_unit()
    for _ in range(2):  # re-opening twice changes nothing either
        with Ledger.open(path, **params) as lg:
            assert lg.epsilon_by_unit() == before
            assert lg.epsilon("record") == before["record"] > 0
