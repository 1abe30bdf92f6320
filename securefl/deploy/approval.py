"""A data owner approves a run before its node takes part (as PySyft's data owners approve requests).

The coordinator writes the experiment config, but the privacy of a data owner's records must not rest on
it. So the owner looks at what a run would release and signs it, and the node refuses anything else:

1. ``securefl approve CONFIG --node-dir DIR --participant ID`` applies the node's own overrides (policy,
   data file, learning rate), then shows the owner in plain words the protocol, every field its
   participants release each round (the protocol's declared uplink schema and the metadata its
   ``with_meta`` calls attach, e.g. record counts and label sets), the DP unit, ε target, δ, the
   calibrated σ and planned spend, the secure aggregation and cohort, signing, and the code version
   (package version and the SHA-256 of the protocol's source). On confirmation it signs the approval with
   the node's Ed25519 key and writes ``NODE_DIR/approvals/<digest>.json``.
2. At ``setup`` a :class:`~securefl.deploy.node.ParticipantNode` refuses, in one line naming the reason,
   a setup that is weaker than its owner's policy file (:func:`policy_violations`: no DP, a larger δ,
   another unit, a secure aggregation or signing or cohort the policy requires but the config lacks), and,
   when it requires an approval (asked to, or holding any approval on disk), a setup whose digest no
   approval signed by its own key carries; it names what differs from the latest approval.
3. The matching approval is written into the participant's ledger (an ``approval`` entry, which spends
   nothing), and ``securefl audit`` shows it.

The digest (:func:`approval_digest`) covers what the coordinator may set and that bears on privacy, after the
node's overrides: the protocol and its section, DP, secure aggregation (and its parameters), signing, the
rounds and participation, the data and training sections, this participant's entry and every participant's
id and model, plus the code version. It leaves out what cannot change what leaves the node: file paths
(the node reads its own), ``run.name`` and ``run.seed`` (DP randomness comes from OS entropy, not from the
seed), and other participants' budgets and learning rates. An owner who approved a setup may therefore
take part in several runs of it; any other change needs a new approval.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from securefl.config import ExperimentConfig, config_differences
from securefl.privacy.ledger import canonical_json

APPROVALS = "approvals"
FORMAT = "securefl-approval/1"
#: Domain separation: an approval signature can never pass for a message or ledger-seal signature.
_DOMAIN = b"securefl-approval/1\n"
#: Methods whose ``with_meta`` calls are the server's (or relay's), not what a participant releases.
_SERVER_METHODS = frozenset({"server_step", "open_round", "setup_server", "relay_step"})


class ApprovalError(ValueError):
    """A setup the node refuses, or an approval that cannot be made or trusted (one line, with the reason)."""


# ----- what is approved -----------------------------------------------------------------------------
def approved_settings(config: ExperimentConfig, participant_id: str) -> dict[str, Any]:
    """The privacy-relevant, coordinator-settable parts of ``config`` (after the node's own overrides)."""
    dumped = config.model_dump(mode="json")
    own = next((p for p in dumped["participants"] if p["id"] == participant_id), None)
    if own is None:
        raise ApprovalError(f"the experiment config has no participant {participant_id!r}")
    data = {k: v for k, v in dumped["data"].items() if k != "data_dir"}
    if isinstance(data.get("files"), dict):
        data["files"] = {k: v for k, v in data["files"].items() if k not in ("test_file", "public_file")}
    settings: dict[str, Any] = {
        "protocol": dumped["protocol"],
        dumped["protocol"]: dumped[dumped["protocol"]],
        "privacy": dumped["privacy"],
        "secure_aggregation": dumped["secure_aggregation"],
        "signing": dumped["signing"],
        "run": {k: v for k, v in dumped["run"].items() if k not in ("seed", "name")},
        "data": data,
        "training": dumped["training"],
        "participant": {k: v for k, v in own.items() if k not in ("data_file", "policy_file")},
        "participants": [{"id": p["id"], "model": p["model"]} for p in dumped["participants"]],
    }
    if dumped["secure_aggregation"] in ("ckks", "masking"):
        settings[dumped["secure_aggregation"]] = dumped[dumped["secure_aggregation"]]
    return settings


def code_version(protocol: str) -> dict[str, str]:
    """The package version and one SHA-256 over the protocol's source files: what computes the releases.

    The files are those of the registered class, of every class it may build instead (FedGen's modes), and of
    their protocol base classes: a change to any of them changes what leaves the node, so it voids an approval."""
    import securefl
    from securefl.protocols import PROTOCOLS

    registered = PROTOCOLS[protocol]
    classes = [registered, *getattr(registered, "modes", {}).values()]
    sources = sorted({Path(inspect.getsourcefile(base) or "") for cls in classes for base in cls.__mro__
                      if base.__module__.startswith("securefl.protocols")})
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + hashlib.sha256(source.read_bytes()).digest())
    return {"securefl": securefl.__version__, "protocol_source": ", ".join(s.name for s in sources),
            "protocol_sha256": digest.hexdigest()}


def approval_digest(config: ExperimentConfig, participant_id: str) -> str:
    """SHA-256 over the canonical JSON of the approved settings and the code version."""
    return _digest(participant_id, approved_settings(config, participant_id), code_version(config.protocol))


def _digest(participant_id: str, settings: dict[str, Any], code: dict[str, Any]) -> str:
    body = {"format": FORMAT, "participant": participant_id, "settings": settings, "code": code}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


# ----- the owner's policy -----------------------------------------------------------------------------
def cohort_fractions(config: ExperimentConfig) -> dict[str, float]:
    """The config's smallest-cohort settings that apply, by field name (fractions of a round's participants)."""
    out: dict[str, float] = {}
    dp_fraction = getattr(config.privacy, "min_contributors", None)
    applies = config.privacy.unit != "none" or config.secure_aggregation == "ckks"
    if applies and isinstance(dp_fraction, int | float):
        out["privacy.min_contributors"] = float(dp_fraction)
    masking_fraction = getattr(getattr(config, "masking", None), "threshold_fraction", None)
    if config.secure_aggregation == "masking" and isinstance(masking_fraction, int | float):
        out["masking.threshold_fraction"] = float(masking_fraction)
    return out


def policy_violations(config: ExperimentConfig, participant_id: str, policy: Any) -> list[str]:
    """How ``config`` is weaker than the owner's :class:`~securefl.privacy.budget.PrivacyPolicy` (empty: it is not)."""
    if policy is None:
        return []
    index, own = next((i, p) for i, p in enumerate(config.participants) if p.id == participant_id)
    problems = []
    unit = config.privacy.unit
    if unit == "none":
        problems.append(f"privacy.unit is 'none' but the owner's policy requires {policy.unit}-level DP "
                        f"(ε ≤ {policy.max_epsilon:g}); a node with a policy never runs without DP and a ledger")
    else:
        if unit != policy.unit:
            problems.append(f"privacy.unit is {unit!r} but the owner's policy protects the {policy.unit!r} unit")
        delta, field = (own.delta, f"participants.{index}.delta") if own.delta is not None else (
            config.privacy.delta, "privacy.delta")
        if delta > policy.delta:
            problems.append(f"{field} = {delta:g} is larger than the owner's policy allows (δ ≤ {policy.delta:g})")
    if policy.secure_aggregation and config.secure_aggregation not in policy.secure_aggregation:
        problems.append(f"secure_aggregation is {config.secure_aggregation!r} but the owner's policy requires "
                        f"{' or '.join(policy.secure_aggregation)}")
    if policy.signing and not config.signing:
        problems.append("signing is off but the owner's policy requires signed messages")
    if policy.min_contributors is not None:
        for field, value in cohort_fractions(config).items():
            if value < policy.min_contributors:
                problems.append(f"{field} = {value:g} is a smaller cohort than the owner's policy allows "
                                f"(min_contributors {policy.min_contributors:g})")
    return problems


# ----- what the owner is shown ------------------------------------------------------------------------
def released_meta(protocol: Any) -> list[str]:
    """Metadata keys a participant attaches to its messages (``with_meta`` calls outside the server's
    methods in the protocol's source), e.g. ``num_samples`` or ``label_split``."""
    source = inspect.getsourcefile(type(protocol))
    if source is None:
        return []
    tree = ast.parse(Path(source).read_text())
    keys: set[str] = set()

    def visit(node: ast.AST, method: str | None) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            method = node.name if method is None else method  # a nested function belongs to its method
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "with_meta"
                and method not in _SERVER_METHODS):
            keys.update(kw.arg for kw in node.keywords if kw.arg)
        for child in ast.iter_child_nodes(node):
            visit(child, method)

    for node in tree.body:
        visit(node, None)
    return sorted(keys)


def _release_lines(config: ExperimentConfig, protocol: Any) -> list[str]:
    lines = []
    uplink = getattr(protocol, "uplink", None)
    if uplink is not None:
        for name, field in uplink.fields.items():
            what = "derived from private data" if field.private else "public"
            how = "summed/averaged only" if field.aggregatable else "read as is"
            lines.append(f"{name}: {field.description or 'no description'} ({what}; {how})")
    declared = protocol.uplink_metadata() if hasattr(protocol, "uplink_metadata") else {}
    for name, field in declared.items():
        what = "derived from private data" if field.private else "public"
        lines.append(f"metadata {name}, in the clear: {field.description or 'no description'} ({what})")
    # Keys a with_meta call in the protocol's client code sends that no declaration names (or all of them,
    # in a protocol that declares none): shown too, so nothing leaves unmentioned.
    undeclared = [key for key in released_meta(protocol) if key not in declared]
    if undeclared:
        lines.append(f"metadata the protocol's code may attach, in the clear: {', '.join(undeclared)}")
    peers = protocol.peer_to_peer() if hasattr(protocol, "peer_to_peer") else None
    if peers:
        lines.append(f"to peers, one message at a time: {peers}")
    elif config.protocol == "fedh2l" and getattr(protocol.config, "exchange", None) == "direct":
        lines.append("fedh2l.exchange = direct: the same fields go to each neighbour, not only to the coordinator")
    outside = protocol.releases_outside_layers() if hasattr(protocol, "releases_outside_layers") else None
    if outside:
        lines.append(f"outside the DP and secure-aggregation layers: {outside}")
    count = "record count withheld under DP" if config.privacy.unit != "none" else "record count"
    lines.append("to the coordinator: evaluation metrics on the test table each evaluated round, and at the end "
                 f"the node's facts (ε spent, {count}, its own learning rate if set)")
    return lines


def plan(config: ExperimentConfig, participant_id: str, *, key_dir: Path) -> dict[str, Any]:
    """What the node would do under ``config``: its releases, and (under DP) its calibrated σ and planned
    spend, computed as the node will (in a scratch directory: no ledger of the node is touched)."""
    from securefl.privacy.calibration import planned_epsilon, planned_event
    from securefl.privacy.mechanisms import histogram_event
    from securefl.runtime.builder import KeyRing
    from securefl.runtime.federation import build_world
    from securefl.runtime.host import ParticipantHost

    _, _, ctx, parties, protocol = build_world(config, "approval-preview", local={participant_id})
    protocol.validate_participants(parties)
    out: dict[str, Any] = {"releases": _release_lines(config, protocol), "participants": len(parties)}
    if hasattr(config, "cohort"):
        cohort = config.cohort()
        out["cohort"] = {"per_round": cohort.per_round, "minimum": cohort.minimum}
    cfg = config.privacy
    if cfg.unit == "none":
        return out
    mine = [p for p in parties if p.id == participant_id]
    with tempfile.TemporaryDirectory() as scratch:
        host = ParticipantHost(config=config, out=Path(scratch), ctx=ctx, protocol=protocol, parties=mine,
                               keys=KeyRing(key_dir), n_participants=len(parties))
        try:
            host.set_up()
            assert host.privacy is not None  # privacy.unit is not 'none' here
            pp = host.privacy.participants[participant_id]
            sigma, steps, rate = pp.noise_multiplier, pp.planned_steps, pp.sample_rate
            if cfg.unit == "record":
                events = [histogram_event(cfg.histogram_noise_multiplier)] * protocol.private_histogram_releases(mine[0])
                events.append(planned_event(noise_multiplier=sigma, sample_rate=rate, steps=steps))
            elif cfg.noise == "local":
                events = [planned_event(noise_multiplier=sigma, sample_rate=1.0, steps=1, unit="participant",
                                        relation="replace_one", sensitivity=2 * cfg.clip_norm)] * steps
            else:
                events = []  # distributed shares: booked for the worst case of t of n, at most the target
            spend = planned_epsilon(events, delta=pp.delta, accountant=cfg.accountant) if events else None
            out.update(noise_multiplier=sigma, planned_steps=steps, sample_rate=rate, target_epsilon=pp.target_epsilon,
                       delta=pp.delta, planned_epsilon=spend, budget_note=pp.budget_note,
                       train_records=mine[0].num_samples)
        finally:
            host.close()
    return out


def propose(config: ExperimentConfig, participant_id: str, *, node_dir: str | Path, policy: Any = None) -> dict[str, Any]:
    """The unsigned approval of ``config`` (already with the node's overrides) for the owner to read."""
    node_dir = Path(node_dir)
    key = node_key(node_dir, participant_id)  # before the slow part: a node without its key cannot approve
    problems = policy_violations(config, participant_id, policy)
    if problems:
        raise ApprovalError(f"this setup is weaker than the owner's policy, and the node would refuse it: "
                            f"{'; '.join(problems)}")
    settings = approved_settings(config, participant_id)
    code = code_version(config.protocol)
    return {"format": FORMAT, "participant": participant_id, "digest": _digest(participant_id, settings, code),
            "settings": settings, "code": code, "shown": plan(config, participant_id, key_dir=node_dir / "keys"),
            "fingerprint": _fingerprint(key)}


def describe(proposal: dict[str, Any]) -> str:
    """The approval in plain words, for the owner."""
    s, shown, code = proposal["settings"], proposal["shown"], proposal["code"]
    privacy = s["privacy"]
    lines = [f"Run for participant {proposal['participant']!r}: protocol {s['protocol']}, "
             f"{s['run']['rounds']} rounds, {shown['participants']} participants, "
             f"a fraction {s['run']['participation']:g} of them sampled each round.",
             "Each round this node releases:"]
    lines += [f"  - {line}" for line in shown["releases"]]
    if privacy["unit"] == "none":
        lines.append("Differential privacy: NONE. What is released is computed from your records without noise, "
                     "and no privacy ledger is kept.")
    else:
        lines.append(f"Differential privacy: {privacy['unit']}-level, ε target {shown['target_epsilon']:g} at "
                     f"δ {shown['delta']:g} ({privacy['accountant']} accountant); {shown['budget_note']}.")
        spend = ("at most the target" if shown["planned_epsilon"] is None
                 else f"ε {shown['planned_epsilon']:.4g}")
        lines.append(f"  planned: σ = {shown['noise_multiplier']:.4g} (calibrated), {shown['planned_steps']} steps "
                     f"at sampling rate {shown['sample_rate']:.4g} on {shown['train_records']} records; "
                     f"planned spend {spend}.")
    cohort = ", ".join(f"{k} {v:g}" for k, v in _cohort_of(s).items())
    if "cohort" in shown:
        cohort = (f"no aggregate of fewer than {shown['cohort']['minimum']} of the {shown['cohort']['per_round']} "
                  f"participants a round ({cohort})")
    lines.append(f"Secure aggregation: {s['secure_aggregation']}"
                 + (f"; minimum cohort: {cohort}" if cohort else "")
                 + ("" if s["secure_aggregation"] != "none" else " (the coordinator sees each release)") + ".")
    signing = "every message is signed (Ed25519) and verified" if s["signing"] else "OFF: messages are not signed"
    lines.append(f"Signing: {signing}.")
    lines.append(f"Code: securefl {code['securefl']}, {code['protocol_source']} sha256 {code['protocol_sha256']}.")
    lines.append(f"Approval digest: {proposal['digest']}; signed with this node's key {proposal['fingerprint']}.")
    return "\n".join(lines)


def _cohort_of(settings: dict[str, Any]) -> dict[str, float]:
    out = {}
    applies = settings["privacy"]["unit"] != "none" or settings["secure_aggregation"] == "ckks"
    if applies and "min_contributors" in settings["privacy"]:
        out["privacy.min_contributors"] = settings["privacy"]["min_contributors"]
    if "masking" in settings and "threshold_fraction" in settings["masking"]:
        out["masking.threshold_fraction"] = settings["masking"]["threshold_fraction"]
    return out


# ----- signing and checking ---------------------------------------------------------------------------
def node_key(node_dir: Path, participant_id: str) -> Any:
    """The node's own Ed25519 private key (never created here: an approval needs the key the node runs with)."""
    from securefl.crypto.keystore import load_or_create_party_keys

    path = Path(node_dir) / "keys" / f"{participant_id}.ed25519"
    if not path.exists():
        raise ApprovalError(f"{path}: no signing key for {participant_id!r}; create the node's keys first "
                            "(securefl keys create, or securefl provision)")
    return load_or_create_party_keys(path.parent, participant_id).private_key


def _fingerprint(key: Any) -> str:
    from securefl.crypto.signing import public_key_bytes
    from securefl.deploy.ceremony import fingerprint

    return fingerprint(public_key_bytes(key))


def _signed_bytes(approval: dict[str, Any]) -> bytes:
    return _DOMAIN + canonical_json({k: v for k, v in approval.items() if k != "signature"}).encode("utf-8")


def sign(proposal: dict[str, Any], node_dir: str | Path) -> Path:
    """Sign ``proposal`` with the node's key and write ``NODE_DIR/approvals/<digest>.json``."""
    from securefl.crypto.keystore import write_private_file

    node_dir = Path(node_dir)
    key = node_key(node_dir, proposal["participant"])
    approval = {**proposal, "fingerprint": _fingerprint(key),
                "approved_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")}
    approval["signature"] = key.sign(_signed_bytes(approval)).hex()
    path = node_dir / APPROVALS / f"{proposal['digest']}.json"
    write_private_file(path, (json.dumps(approval, indent=1, sort_keys=True) + "\n").encode("utf-8"), atomic=True)
    return path


def read_approval(path: Path, participant_id: str, key: Any) -> dict[str, Any]:
    """Read an approval file and verify it: the node's own key signed it, and its digest is that of its
    settings (and its file name)."""
    try:
        approval = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(approval, dict) or approval.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        key.public_key().verify(bytes.fromhex(approval["signature"]), _signed_bytes(approval))
    except InvalidSignature:
        raise ApprovalError(f"{path}: the approval's signature does not verify with this node's key (altered, or "
                            "not signed by its owner); refusing") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ApprovalError(f"{path}: not a readable approval ({type(exc).__name__}: {exc}); refusing") from None
    if approval.get("participant") != participant_id:
        raise ApprovalError(f"{path}: an approval for {approval.get('participant')!r}, not {participant_id!r}")
    digest = _digest(participant_id, approval["settings"], approval["code"])
    if approval.get("digest") != digest or path.stem != digest:
        raise ApprovalError(f"{path}: the approval's digest does not match what it approves; refusing")
    return approval


def check_setup(config: ExperimentConfig, participant_id: str, node_dir: str | Path, *, policy: Any = None,
                require_approval: bool = False) -> dict[str, Any] | None:
    """The node's gate at ``setup``: refuse (:class:`ApprovalError`, one line) a setup weaker than the owner's
    policy, or, when an approval is required, one that no approval signed by the node's key carries.
    Returns the matching approval (None when none is required)."""
    node_dir = Path(node_dir)
    problems = policy_violations(config, participant_id, policy)
    if problems:
        raise ApprovalError(f"refused: the setup is weaker than the owner's policy: {'; '.join(problems)}")
    folder = node_dir / APPROVALS
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not require_approval and not files:
        return None
    key = node_key(node_dir, participant_id)
    settings, code = approved_settings(config, participant_id), code_version(config.protocol)
    digest = _digest(participant_id, settings, code)
    if (folder / f"{digest}.json").exists():
        return read_approval(folder / f"{digest}.json", participant_id, key)
    approved = []
    for path in files:
        try:
            approved.append(read_approval(path, participant_id, key))
        except ApprovalError:
            continue  # a damaged approval approves nothing; the refusal below names what is missing
    if not approved:
        raise ApprovalError(f"refused: the owner of {participant_id!r} has approved no setup (no signed approval in "
                            f"{folder}); the owner must run `securefl approve` first")
    latest = max(approved, key=lambda a: str(a.get("approved_at", "")))
    changes = [_change(path, latest["settings"], settings) for path in config_differences(latest["settings"], settings)]
    changes += [_change(path, latest["code"], code, prefix="code.") for path in config_differences(latest["code"], code)]
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    raise ApprovalError(f"refused: the setup differs from what the owner approved (approval {latest['digest'][:12]}): "
                        f"{shown}; the owner must approve it (securefl approve)")


def _change(path: str, old: dict[str, Any], new: dict[str, Any], *, prefix: str = "") -> str:
    return f"{prefix}{path} {_short(_at(old, path))} -> {_short(_at(new, path))}"


def _at(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(tree, dict):
            tree = tree.get(part, "(absent)")
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return tree
    return tree


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def ledger_record(approval: dict[str, Any]) -> dict[str, Any]:
    """What the ledger's ``approval`` entry carries of an approval: what was approved, and when."""
    shown = approval.get("shown", {})
    return {"settings": approval["settings"], "code": approval["code"], "approved_at": approval.get("approved_at"),
            "planned": {k: shown[k] for k in ("noise_multiplier", "planned_steps", "sample_rate", "target_epsilon",
                                              "delta", "planned_epsilon") if k in shown}}
