"""Experiment configuration: one YAML file, validated by pydantic.

Every section is frozen and forbids unknown keys, so a typo is an error, not a
silently ignored option. Each registered protocol has its own section, named
after it (``fedmd:``, ``fml:`` ...), built from the protocol's ``Config`` class;
``protocol:`` chooses which one runs, so one file can carry the settings of
several protocols and a comparison is a single ``--set protocol=...``.

Errors are reported as one line naming the field, the bad value and what is
allowed (:func:`format_validation_error`).
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator
from pydantic import Field as PydField

from securefl.core.section import Section
from securefl.crypto.ckks.params import CkksParams
from securefl.data.config import (  # noqa: F401 - re-exported: the data section is part of the experiment config
    DataConfig,
    DirichletPartition,
    ExplicitPartition,
    FewShotPartition,
    FilesConfig,
    IidPartition,
    Partition,
    ShardPartition,
)
from securefl.models.zoo import ModelName
from securefl.privacy.cohort import Cohort, participants_per_round
from securefl.protocols import PROTOCOLS, ProtocolConfig
from securefl.protocols.fedavg import FedAvgConfig
from securefl.protocols.fedgen_common import FedGenConfig
from securefl.protocols.fedh2l import FedH2LConfig
from securefl.protocols.fedmd import FedMDConfig
from securefl.protocols.fml import FMLConfig
from securefl.protocols.heterofl import HeteroFLConfig
from securefl.protocols.local_only import LocalOnlyConfig
from securefl.protocols.pooled import PooledConfig


class RunConfig(Section):
    seed: int = 0
    rounds: int = PydField(10, ge=1, le=100_000)
    participation: float = PydField(1.0, gt=0, le=1, description="fraction of participants sampled per round")
    eval_every: int = PydField(1, ge=1)
    name: str | None = None


class TrainingConfig(Section):
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = PydField(1e-3, gt=0, le=10)
    momentum: float = PydField(0.9, ge=0, lt=1)
    weight_decay: float = PydField(0.0, ge=0)
    batch_size: int = PydField(32, ge=1)
    local_epochs: int = PydField(1, ge=1)
    max_grad_norm: float | None = PydField(None, gt=0)
    # The same start for every protocol: each owner first fits its own model alone, with early stopping on its
    # validation split, as the local-only baseline does before round 1 (FedMD's transfer step already is one).
    warm_start: bool = PydField(False, description="an early-stopped local fit of each owner's model before round 1")
    warm_start_max_epochs: int = PydField(50, ge=1, description="epochs cap of the warm start")
    warm_start_patience: int = PydField(5, ge=1, description="epochs without a better validation loss before it stops")


PARTY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ParticipantConfig(Section):
    id: str
    model: ModelName
    # The participant's own ε target (overrides privacy.target_epsilon for this participant).
    target_epsilon: float | None = PydField(None, gt=0)
    delta: float | None = PydField(None, gt=0, lt=1)
    # A policy file the data owner controls; the stricter of it and the experiment binds.
    policy_file: str | None = None
    # The owner's own learning rate for training its model, in place of the protocol's (training.lr, or fml.lr,
    # fedgen.lr, heterofl.lr): in a heterogeneous federation one rate need not suit every architecture and
    # budget, e.g. under DP-SGD a rate that trains a small CNN well can make a wide MLP at ε = 1 diverge.
    lr: float | None = PydField(None, gt=0, le=10)
    # data.dataset = files: this owner's table (on a deployed node, the owner's node config says where).
    data_file: str | None = None

    @field_validator("id")
    @classmethod
    def _id_is_safe(cls, value: str) -> str:
        # Ids become file names (ledgers, keys), so keep them to a safe alphabet.
        if not PARTY_ID_PATTERN.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-', starting alphanumeric")
        return value



class PrivacyConfig(Section):
    """Differential privacy: which unit, what target, how to account."""

    unit: Literal["none", "record", "participant"] = PydField(
        "none", description="record: DP-SGD on all private training; participant: clip+noise every shared payload")
    target_epsilon: float | None = PydField(None, gt=0, description="default ε target of every participant")
    delta: float = PydField(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld", "prv"] = "rdp"
    max_grad_norm: float = PydField(1.0, gt=0, description="DP-SGD per-example clipping bound (record level)")
    histogram_noise_multiplier: float = PydField(
        10.0, gt=0, description="record level: σ of a released label histogram (Gaussian, sensitivity 1, e.g. FedGen)")
    clip_norm: float = PydField(1.0, gt=0, description="L2 bound of each shared payload (participant level)")
    noise: Literal["local", "distributed"] = PydField(
        "local", description="participant level: full noise at each participant, or shares summed under secure aggregation")
    min_contributors: float = PydField(
        0.67, gt=0, le=1, description="minimum cohort under CKKS or distributed noise: the fewest contributors an "
        "aggregate may hold, as a fraction of a round's participants (t = max(ceil(f·n), n//2+1)); participants "
        "refuse to open fewer, and distributed noise is booked for the shares of t")


class MaskingConfig(Section):
    threshold_fraction: float = PydField(
        0.67, gt=0.5, le=1, description="Shamir threshold t as a fraction of the round's participants (t > n/2); "
        "with distributed noise the larger of this and privacy.min_contributors is the one t of both")


class ExperimentConfig(Section):
    protocol: str
    secure_aggregation: Literal["none", "ckks", "masking"] = "none"
    ckks: CkksParams = PydField(default_factory=CkksParams)
    masking: MaskingConfig = PydField(default_factory=MaskingConfig)
    signing: bool = PydField(True, description="sign every message (Ed25519) and verify on receipt")
    privacy: PrivacyConfig = PydField(default_factory=PrivacyConfig)
    run: RunConfig = PydField(default_factory=RunConfig)
    data: DataConfig = PydField(default_factory=DataConfig)
    training: TrainingConfig = PydField(default_factory=TrainingConfig)
    participants: list[ParticipantConfig] = PydField(min_length=1)
    # One section per registered protocol, typed by its own Config (tests/test_config_sections.py checks that
    # every protocol of the registry has its section here, and nothing else).
    fedmd: FedMDConfig = PydField(default_factory=FedMDConfig)
    local_only: LocalOnlyConfig = PydField(default_factory=LocalOnlyConfig)
    pooled: PooledConfig = PydField(default_factory=PooledConfig)
    fedavg: FedAvgConfig = PydField(default_factory=FedAvgConfig)
    fml: FMLConfig = PydField(default_factory=FMLConfig)
    fedh2l: FedH2LConfig = PydField(default_factory=FedH2LConfig)
    fedgen: FedGenConfig = PydField(default_factory=FedGenConfig)
    heterofl: HeteroFLConfig = PydField(default_factory=HeteroFLConfig)

    @field_validator("protocol")
    @classmethod
    def _protocol_exists(cls, value: str) -> str:
        if value not in PROTOCOLS:
            raise ValueError(f"unknown protocol; allowed: {', '.join(PROTOCOLS)}")
        return value

    @field_validator("participants")
    @classmethod
    def _unique_ids(cls, value: list[ParticipantConfig]) -> list[ParticipantConfig]:
        counts = Counter(p.id for p in value)  # not ids.count per id: K² at a thousand participants
        dupes = sorted(i for i, n in counts.items() if n > 1)
        if dupes:
            raise ValueError(f"participant ids must be unique; repeated: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _partition_fits(self) -> ExperimentConfig:
        partition = self.data.partition
        if isinstance(partition, ExplicitPartition):
            if len(partition.assignment) != len(self.participants):
                raise ValueError(
                    f"data.partition.assignment has {len(partition.assignment)} lists for "
                    f"{len(self.participants)} participants"
                )
            for i, (indices, participant) in enumerate(zip(partition.assignment, self.participants, strict=True)):
                if not indices:
                    raise ValueError(f"data.partition.assignment.{i}: participant {participant.id!r} has an empty "
                                     "split; every participant needs at least one training record")
        return self

    @model_validator(mode="after")
    def _owner_data(self) -> ExperimentConfig:
        data = self.data
        with_file = [i for i, p in enumerate(self.participants) if p.data_file is not None]
        if data.dataset in ("files", "tables"):
            if data.files is None:
                raise ValueError(f"data.files: required when data.dataset is {data.dataset!r} (label_column, "
                                 "num_classes, test_file, public_file)")
            if data.public_size:
                raise ValueError("data.public_size: the public set of owner-supplied data is data.files.public_file")
            if data.holdout_size:
                raise ValueError(f"data.holdout_size = {data.holdout_size}: owner-supplied data has no shared train "
                                 "split to hold records out of; give a validation table as data.files.test_file")
            if data.dataset == "files":
                missing = [i for i, p in enumerate(self.participants) if p.data_file is None]
                if missing:
                    raise ValueError(f"participants.{missing[0]}.data_file: required when data.dataset is 'files'")
                if data.files.test_file is None:
                    raise ValueError("data.files.test_file: required when data.dataset is 'files'")
        elif with_file or data.files is not None:
            where = f"participants.{with_file[0]}.data_file" if with_file else "data.files"
            raise ValueError(f"{where}: only used when data.dataset is 'files' (it is {data.dataset!r})")
        return self

    @model_validator(mode="after")
    def _owner_rates_are_used(self) -> ExperimentConfig:
        with_rate = [i for i, p in enumerate(self.participants) if p.lr is not None]
        if with_rate and self.protocol == "pooled":
            i = with_rate[0]
            raise ValueError(f"participants.{i}.lr = {self.participants[i].lr}: the pooled baseline trains one model "
                             "per architecture on everyone's data, no owner's own model; remove it")
        return self

    @model_validator(mode="after")
    def _privacy_targets(self) -> ExperimentConfig:
        privacy = self.privacy
        if privacy.unit == "none":
            targeted = [i for i, p in enumerate(self.participants) if p.target_epsilon is not None]
            if privacy.target_epsilon is not None or targeted:
                raise ValueError("privacy.unit is 'none' but ε targets are set; choose privacy.unit: record or participant")
            return self
        missing = [i for i, p in enumerate(self.participants) if p.target_epsilon is None and p.policy_file is None]
        if privacy.target_epsilon is None and missing:
            raise ValueError(
                f"participants.{missing[0]}.target_epsilon: required when privacy.unit is {privacy.unit!r} "
                "(or set privacy.target_epsilon for everyone, or a policy_file)")
        if privacy.noise == "distributed" and self.secure_aggregation == "none":
            raise ValueError("privacy.noise = 'distributed' needs secure_aggregation (ckks or masking): without it "
                             "the server sees each participant's share, which carries only part of the noise")
        return self

    @model_validator(mode="after")
    def _cohort_of_two(self) -> ExperimentConfig:
        n = self.cohort().per_round
        if self.secure_aggregation != "none" and n < 2:
            # A "sum" of one contributor is that owner's payload: every key holder could open it.
            raise ValueError(
                f"run.participation = {self.run.participation:g} samples {n} of {len(self.participants)} "
                f"participants a round; secure_aggregation = {self.secure_aggregation!r} needs at least 2 per "
                "round (an aggregate of one contributor is that owner's payload)")
        return self

    def cohort_fraction(self) -> float:
        """The fraction that gives the one minimum cohort t: the larger of those in force (masking's threshold
        under masking, privacy.min_contributors under CKKS or distributed noise)."""
        if self.secure_aggregation != "masking":
            return self.privacy.min_contributors
        if self.privacy.unit == "participant" and self.privacy.noise == "distributed":
            return max(self.masking.threshold_fraction, self.privacy.min_contributors)
        return self.masking.threshold_fraction

    def cohort(self) -> Cohort:
        """n (participants sampled a round, from participation × participants) and the minimum cohort t."""
        return Cohort.plan(per_round=participants_per_round(self.run.participation, len(self.participants)),
                           fraction=self.cohort_fraction(), participants=[p.id for p in self.participants])

    def protocol_config(self) -> ProtocolConfig:
        """The section of the protocol this experiment runs."""
        section: ProtocolConfig = getattr(self, self.protocol)
        return section


class ConfigError(ValueError):
    """Bad configuration; the message is one line naming the field and the bad value."""


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        # Discriminated unions add the tag to the location; drop it so the path matches the YAML.
        loc = re.sub(r"\.(dirichlet|shards|iid|explicit)(?=\.|$)", "", loc)
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:
            # A rule across fields (a model validator): its message names the field; the input is the whole config.
            parts.append(msg)
        elif err["type"] == "missing":
            parts.append(f"{loc}: required field is missing")
        elif err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown field (value {_short(err['input'])})")
        else:
            parts.append(f"{loc} = {_short(err['input'])}: {msg}")
    return f"{source}: " + "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_config(raw: Any, source: str = "config") -> ExperimentConfig:
    """Validate a mapping into an ``ExperimentConfig``; raise :class:`ConfigError` with one line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_raw(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    return load_raw_text(text, str(path))


def load_raw_text(text: str, source: str = "config") -> Any:
    """Parse YAML text; any failure is a one-line :class:`ConfigError` naming ``source``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # PyYAML's constructors raise these for well-formed but impossible scalars, e.g. the date
        # 2024-13-01 or `!!float abc`.
        raise ConfigError(f"{source}: not valid YAML: {str(exc).splitlines()[0][:120]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    if raw is None:
        raise ConfigError(f"{source}: the file is empty")
    return raw


def parse_config_text(text: str, source: str = "config") -> ExperimentConfig:
    """YAML text to an ``ExperimentConfig``; raises only :class:`ConfigError`."""
    return parse_config(load_raw_text(text, source), source)


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``changes`` merged in, section by section."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars; list items by index)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        if isinstance(value, str):
            try:  # YAML 1.1 reads a float without a dot (2e-3) as a string
                value = float(value)
            except ValueError:
                pass
        node: Any = raw
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is not a section")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    raw = apply_overrides(load_raw(path), overrides or [])
    return parse_config(raw, str(path))


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths (``fedgen.local_steps``, ``participants.3.model``) at which two dumped configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [path for key in sorted(set(old) | set(new), key=str)
                for path in config_differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [path for i, (a, b) in enumerate(zip(old, new, strict=True))
                for path in config_differences(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".") or "(the whole config)"]


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
