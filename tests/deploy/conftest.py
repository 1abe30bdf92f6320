"""The healthcare example's data files, written once for the deployment tests."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "healthcare"


@pytest.fixture(scope="session")
def hospital_data(tmp_path_factory) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", EXAMPLE / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    out = tmp_path_factory.mktemp("hospital_data")
    module.main(["--out", str(out)])
    return out
