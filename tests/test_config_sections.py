"""The experiment config is a real class: one typed section per registered protocol, and nothing else."""

from __future__ import annotations

from securefl.config import ExperimentConfig, parse_config
from securefl.protocols import PROTOCOLS
from securefl.protocols.base import ProtocolConfig
from tests.conftest import tiny_raw


def test_every_registered_protocol_has_its_own_typed_section_and_no_other_is_there() -> None:
    sections = {name for name, field in ExperimentConfig.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, ProtocolConfig)}
    assert sections == set(PROTOCOLS)
    for name, protocol in PROTOCOLS.items():
        assert ExperimentConfig.model_fields[name].annotation is protocol.Config


def test_protocol_config_is_the_running_protocols_section() -> None:
    config = parse_config(tiny_raw(protocol="fml", fml={"alpha": 0.25}))
    assert isinstance(config, ExperimentConfig)
    assert config.protocol_config() is config.fml and config.fml.alpha == 0.25
