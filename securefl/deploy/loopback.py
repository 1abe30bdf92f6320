"""A whole Flower federation on one machine: a SuperLink and one SuperNode per data owner, on 127.0.0.1.

Used by the integration test and the healthcare example (``securefl deploy-loopback``). Every component is a
separate OS process started exactly as an operator would start it on separate machines; only the addresses
differ. Shutdown is bounded: SIGTERM to each process group, SIGKILL after ``grace`` seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from securefl.config import ExperimentConfig

APP_DIR = Path(__file__).resolve().parent / "flower_app"


class LoopbackError(RuntimeError):
    """A process of the loopback federation failed; the message carries the end of its log."""


@dataclass
class NodeSpec:
    """What a data owner configures on its own SuperNode."""

    participant_id: str
    node_dir: Path
    policy_file: Path | None = None
    data_file: Path | None = None
    lr: float | None = None
    approval: bool = False  # take part only in a setup the owner approved
    # Where this machine keeps the shared tables and datasets: a node reads no path it was not given.
    public_file: Path | None = None
    test_file: Path | None = None
    data_dir: Path | None = None

    def node_config(self) -> str:
        parts = [f'participant-id="{self.participant_id}"', f'node-dir="{self.node_dir}"']
        if self.policy_file:
            parts.append(f'policy-file="{self.policy_file}"')
        if self.data_file:
            parts.append(f'data-file="{self.data_file}"')
        for key, value in (("public-file", self.public_file), ("test-file", self.test_file), ("data-dir", self.data_dir)):
            if value:
                parts.append(f'{key}="{value}"')
        if self.lr is not None:
            parts.append(f"lr={self.lr!r}")
        if self.approval:
            parts.append("approval=true")
        return " ".join(parts)


@dataclass
class LoopbackFederation:
    workdir: Path
    nodes: list[NodeSpec]
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)
    grace: float = 10.0
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def __enter__(self) -> LoopbackFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir / "flwr_home"
        home.mkdir(exist_ok=True)
        self.link_port = free_port()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        try:
            self._start("superlink", [self._bin("flower-superlink"), "--insecure",
                                      "--disable-runtime-dependency-installation", "--port", str(self.link_port)],
                        self.link_port)
            for spec in self.nodes:
                port = free_port()
                self._start(spec.participant_id, [self._bin("flower-supernode"), "--insecure", "--superlink",
                                                  f"127.0.0.1:{self.link_port}", "--port", str(port),
                                                  "--node-config", spec.node_config()], port)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, run_config: Mapping[str, Any], *, timeout: float = 1800.0,
            stream: bool = True) -> subprocess.CompletedProcess:
        """``flwr run`` of the securefl app with ``run_config`` (config, out, timeout, wait-for-nodes).
        ``stream``: wait for the run and return its log; otherwise return once the run is submitted."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        return subprocess.run([self._bin("flwr"), "run", str(APP_DIR), "loopback", *(["--stream"] if stream else []),
                               "--run-config", overrides], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def server_app_pids(self) -> list[int]:
        """The running ServerApp processes (``flwr-serverapp``) the SuperLink started."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"flwr-serverapp") for part in cmdline[:2]) and self._launched_here(int(proc.name)):
                pids.append(int(proc.name))
        return pids

    def _launched_here(self, pid: int) -> bool:
        """Whether ``pid`` descends from one of this federation's processes."""
        ours = {p.pid for _, p in self.processes}
        while pid > 1:
            if pid in ours:
                return True
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                return False
        return False

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        for _, proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in self.processes:
            try:
                proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=self.grace)
        self.processes.clear()

    def _bin(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.exists():
            raise LoopbackError(f"{path} not found: install the Flower extra (pip install 'securefl[flower]')")
        return str(path)

    def _start(self, name: str, cmd: list[str], port: int) -> None:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - the process writes to it until stopped
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.processes.append((name, proc))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LoopbackError(f"{name} exited with {proc.returncode}: {self.log(name)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise LoopbackError(f"{name} did not open port {port} within 60 s: {self.log(name)}")


def approve_on_nodes(config: ExperimentConfig, specs: list[NodeSpec]) -> None:
    """Each owner's ``securefl approve --yes`` of ``config`` on its node, with its node's own settings; the
    specs then require an approval."""
    from securefl.config import dump_config
    from securefl.deploy import approval
    from securefl.deploy.node import ParticipantNode
    from securefl.privacy.budget import PrivacyPolicy

    text = dump_config(config)
    for spec in specs:
        node = ParticipantNode(spec.node_dir, spec.participant_id, policy_file=spec.policy_file,
                               data_file=spec.data_file, lr=spec.lr, public_file=spec.public_file,
                               test_file=spec.test_file, data_dir=spec.data_dir)
        policy = PrivacyPolicy.from_file(spec.policy_file) if spec.policy_file else None
        approval.sign(approval.propose(node.accepted_config(text), spec.participant_id, node_dir=spec.node_dir,
                                       policy=policy), spec.node_dir)
        spec.approval = True


def _paths(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {key: Path(value) for key, value in settings.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(value: Any) -> str:
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value) if not isinstance(value, bool) else str(value).lower()


def deploy_loopback(config_path: str | Path, out: str | Path, *, timeout: float = 1800.0,
                    approve: bool = True) -> dict[str, Any]:
    """Provision, start a SuperLink and one SuperNode per participant, run, stop; the coordinator's summary.

    Layout under ``out``: ``coordinator/`` (the ServerApp's run directory), ``nodes/<id>/`` (each owner's
    node directory: keys, ledger, checkpoints, its report), ``logs/`` (every process's log).
    Each node is configured with the participant's own ``policy_file``, ``data_file`` and ``lr`` from the config,
    and the shared tables' and data directory's paths, as its owner would set them in ``--node-config``.

    ``approve``: each node requires its owner's approval (``approval=true``), and, this machine standing in
    for every owner, the run's setup is approved on each node as ``securefl approve --yes`` would (shown in
    ``nodes/<id>/approvals/``). Without it the nodes run without approvals, under their policies only.
    """
    import json

    from securefl.config import load_config
    from securefl.deploy.node import settings_from_config
    from securefl.deploy.provision import provision

    config = load_config(config_path)
    out = Path(out).resolve()
    coordinator = out / "coordinator"
    if (coordinator / "summary.json").exists():
        raise LoopbackError(f"{coordinator} already holds a finished run; choose another --out")
    specs = [NodeSpec(p.id, out / "nodes" / p.id,
                      policy_file=Path(p.policy_file).resolve() if p.policy_file else None, lr=p.lr,
                      **_paths(settings_from_config(config, p.id)))
             for p in config.participants]
    provision(config, coordinator_dir=coordinator, node_dirs={s.participant_id: s.node_dir for s in specs})
    if approve:
        approve_on_nodes(config, specs)
    with LoopbackFederation(out / "logs", specs) as federation:
        result = federation.run({"config": str(Path(config_path).resolve()), "out": str(coordinator),
                                 "timeout": 600.0, "wait-for-nodes": 120.0}, timeout=timeout)
        # flwr run can exit 0 although the ServerApp raised: its streamed log says so.
        if result.returncode != 0 or "unhandled exception occurred in the ServerApp" in result.stdout:
            raise LoopbackError(f"flwr run failed ({result.returncode}): {result.stdout[-3000:]}{result.stderr[-2000:]}")
        deadline = time.monotonic() + 120
        while not (coordinator / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not (coordinator / "summary.json").exists():
            raise LoopbackError(f"the run ended without {coordinator / 'summary.json'}: "
                                f"{federation.log('superlink')}\n{result.stdout[-2000:]}")
    return json.loads((coordinator / "summary.json").read_text())
