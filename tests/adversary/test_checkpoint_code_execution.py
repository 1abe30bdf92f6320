"""Finding 12, as a reader/writer of a run directory: a crafted ``checkpoints/last.pt`` must not run code on
``--resume``.

The attacker can write into a run directory (a shared disk, a restored backup) and replaces the checkpoint with
a pickle whose ``__reduce__`` writes a marker file. Resuming the run must refuse the file, naming it, and the
marker must never appear: a checkpoint is loaded without executing anything it names.
"""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest

from tests.conftest import tiny_config


class _RunsCode:
    """Unpickling this calls ``exec`` with the attacker's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


@pytest.mark.parametrize("where", ["simulation", "node"])
def test_a_crafted_checkpoint_is_refused_and_runs_no_code(tmp_path: Path, where: str) -> None:
    from securefl.runtime.checkpoint import RunDirError
    from securefl.runtime.federation import Federation

    config = tiny_config(run={"rounds": 2})
    out = tmp_path / "run"
    Federation(config, out, progress=False).run()  # a genuine run: run.json, config.yaml, ledgers, checkpoint
    marker = tmp_path / "marker"
    evil = pickle.dumps({"round": 1, "run_id": "x", "metrics_lines": 0, "protocol": _RunsCode(marker),
                         "parties": {}})

    if where == "simulation":
        (out / "checkpoints" / "last.pt").write_bytes(evil)
        with pytest.raises(Exception) as raised:  # noqa: PT011 - which error is checked below, after the marker
            Federation(config, out, progress=False, resume=True).run()
    else:
        # The same file as a node's checkpoint, which every request of a fresh node process loads.
        from securefl.runtime.checkpoint import load_checkpoint

        node_checkpoint = tmp_path / "node" / "checkpoints" / "node.pt"
        node_checkpoint.parent.mkdir(parents=True)
        node_checkpoint.write_bytes(evil)
        with pytest.raises(Exception) as raised:  # noqa: PT011
            load_checkpoint(node_checkpoint)

    assert not marker.exists(), "loading the checkpoint ran the attacker's code"
    assert isinstance(raised.value, RunDirError), raised.value
    message = str(raised.value)
    assert "refusing to load it" in message and ("last.pt" in message or "node.pt" in message)
    assert "could run code" in message


def test_a_genuine_checkpoint_still_resumes(tmp_path: Path) -> None:
    """Not an attack: the safe loader still reads what securefl writes (a CKKS run, whose update log holds sealed
    values, the classes the loader allows besides plain values)."""
    from securefl.runtime.checkpoint import load_checkpoint
    from securefl.runtime.federation import Federation

    config = tiny_config(protocol="fml", secure_aggregation="ckks", run={"rounds": 2})
    out = tmp_path / "run"
    Federation(config, out, progress=False).run()
    assert load_checkpoint(out / "checkpoints" / "last.pt")["round"] == 2
