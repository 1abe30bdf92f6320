"""Package namespaces whose names load on first use (PEP 562), so importing a package costs nothing it does not
use: the config imports ``securefl.privacy.cohort`` and ``securefl.crypto.ckks.params`` without loading Opacus or
TenSEAL through their packages."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_attributes(package: str, exports: Mapping[str, str], names: Sequence[str],
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps each name to the module defining it,
    absolute or relative to the package (``".context"``); a loaded name is cached in the package."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package if module.startswith(".") else None), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
