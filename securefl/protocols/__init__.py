"""The protocol registry. Adding an algorithm: one file, one entry here, one test file."""

from __future__ import annotations

# fedgen is one class per fedgen.mode, each registering itself with FedGen on import: FedGen(config, ctx)
# builds the class of the configured mode.
from securefl.protocols import fedgen_private, fedgen_reference  # noqa: F401
from securefl.protocols.base import Field, Protocol, ProtocolConfig, ProtocolSetupError, Schema
from securefl.protocols.fedavg import FedAvg
from securefl.protocols.fedgen_common import FedGen
from securefl.protocols.fedh2l import FedH2L
from securefl.protocols.fedmd import FedMD
from securefl.protocols.fml import FML
from securefl.protocols.heterofl import HeteroFL
from securefl.protocols.local_only import LocalOnly
from securefl.protocols.pooled import Pooled

PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (FedMD, LocalOnly, Pooled, FedAvg, FML, FedH2L, FedGen, HeteroFL)}


def get_protocol(name: str) -> type[Protocol]:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; allowed: {', '.join(PROTOCOLS)}") from None


__all__ = ["PROTOCOLS", "Field", "Protocol", "ProtocolConfig", "ProtocolSetupError", "Schema", "get_protocol"]
