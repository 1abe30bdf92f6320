"""Who may import whom (``../shared/spec/architecture.md``), checked by import-linter against the contracts in
pyproject.toml, and the cost of importing the configuration."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter")


def lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_every_import_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_floors_contract_catches_an_upward_import(tmp_path):
    """The same floors on a two-file package whose core imports the runtime: the check must fail, or the test
    above proves nothing."""
    pkg = tmp_path / "securefl"
    for floor in ("core", "runtime"):
        (pkg / floor).mkdir(parents=True)
        (pkg / floor / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "message.py").write_text("from securefl.runtime import federation\n")
    (pkg / "runtime" / "federation.py").write_text("")
    (tmp_path / ".importlinter").write_text(textwrap.dedent("""\
        [importlinter]
        root_package = securefl

        [importlinter:contract:floors]
        name = floors
        type = layers
        layers =
            securefl.runtime
            securefl.core
        """))
    result = lint_imports(tmp_path, "--config", str(tmp_path / ".importlinter"))
    assert result.returncode != 0
    assert "securefl.core.message -> securefl.runtime.federation" in result.stdout


def test_importing_the_config_loads_neither_tenseal_nor_opacus():
    """Validating a YAML file must not cost the cryptography's and the DP library's import time (TenSEAL alone
    took 4.7 s), and a node that only checks a config should not load them at all."""
    probe = ("import sys, securefl.config; "
             "print(sorted(m for m in ('tenseal', 'opacus', 'cryptography') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
