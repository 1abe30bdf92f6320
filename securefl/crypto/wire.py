"""Keep secret keys off the wire.

architecture.md requires that "the type that holds a secret key cannot be handed
to the transport". Two mechanisms enforce it:

* :class:`SecretHolder`, a mixin for every securefl type that holds secret
  material (the CKKS key-holder context, SecAgg client state, Ed25519 party
  keys). It refuses ``pickle``/``copy``, which is how objects usually leak into
  a multiprocessing transport or a checkpoint by accident.
* :func:`assert_wire_safe`, which a transport (or a test) calls on whatever it
  is about to send. It walks containers, messages, pydantic models, dataclasses
  and plain objects, and raises :class:`TypeError` naming the path to the first
  secret it finds.

This module imports neither TenSEAL nor ``cryptography`` at import time, so the
runtime can use it cheaply.
"""

from __future__ import annotations

import dataclasses
import struct
import types
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np
import torch
from pydantic import BaseModel

__all__ = ["SecretHolder", "assert_wire_safe", "holds_secret", "length_prefixed", "split_length_prefixed"]

# Bounds the walk over arbitrary object graphs; a wire object nested deeper than
# this is itself suspicious.
_MAX_DEPTH = 64
# Code objects are not walked: a function is not data that a transport sends.
_OPAQUE = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType)


class SecretHolder:
    """Mixin for objects that hold secret key material.

    Subclasses cannot be pickled or copied. Use the explicitly named export
    method of the subclass (for example
    :meth:`securefl.crypto.ckks.KeyHolderContext.export_secret_for_committee`)
    when a secret really must move, so that every such move is visible in code
    review.
    """

    #: A short description used in error messages, e.g. "CKKS secret key".
    _secret_kind: str = "secret key material"
    #: How to move the secret deliberately, appended to the refusal message.
    _export_hint: str = ""

    def _refuse(self) -> NoReturn:
        raise TypeError(
            f"{type(self).__name__} holds a {self._secret_kind} and must never be pickled, copied or "
            "sent over the wire" + (f"; {self._export_hint}" if self._export_hint else "")
        )

    def __getstate__(self) -> NoReturn:
        self._refuse()

    def __reduce__(self) -> NoReturn:
        self._refuse()

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        self._refuse()

    def __copy__(self) -> NoReturn:
        self._refuse()

    def __deepcopy__(self, memo: Any) -> NoReturn:
        self._refuse()


def _secret_reason(obj: Any) -> str | None:
    """Return why ``obj`` itself holds a secret, or ``None`` if it does not."""
    if isinstance(obj, SecretHolder):
        return f"{type(obj).__name__} holds a {obj._secret_kind}"
    module = type(obj).__module__ or ""
    if module.startswith("cryptography"):
        # Every asymmetric private key type in `cryptography` has "PrivateKey" in its
        # class name (Ed25519PrivateKey, X25519PrivateKey, RSAPrivateKey, ...).
        if "PrivateKey" in type(obj).__name__:
            return f"{type(obj).__name__} is a private key"
        return None
    if module.startswith("tenseal") or module.startswith("_tenseal_cpp"):
        ctx = obj
        if hasattr(obj, "context") and callable(obj.context) and not hasattr(obj, "is_private"):
            try:
                ctx = obj.context()
            except Exception:  # noqa: BLE001 - a detached tensor has no context, hence no key
                return None
        is_private = getattr(ctx, "is_private", None)
        if callable(is_private) and is_private():
            return f"{type(obj).__name__} is linked to a TenSEAL context that holds the secret key"
    return None


def holds_secret(obj: Any) -> bool:
    """Return ``True`` if :func:`assert_wire_safe` would reject ``obj``."""
    try:
        assert_wire_safe(obj)
    except TypeError:
        return True
    return False


def assert_wire_safe(obj: Any, *, name: str = "object") -> Any:
    """Raise ``TypeError`` if ``obj`` holds (or contains) a secret key; return ``obj`` otherwise.

    Parameters
    ----------
    obj
        Anything a transport is about to send: a :class:`~securefl.core.message.Message`,
        a payload dict, a context, a participant object.
    name
        Used as the root of the path in the error message.

    Returns
    -------
    Any
        ``obj`` itself, so the call can wrap a send: ``send(assert_wire_safe(msg))``.

    Raises
    ------
    TypeError
        Naming the path to the secret, e.g. ``object.meta['ctx']: KeyHolderContext
        holds a CKKS secret key``.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(obj, name, 0)]
    while stack:
        item, path, depth = stack.pop()
        if item is None or isinstance(item, str | bytes | bytearray | memoryview | int | float | bool | complex):
            continue
        if isinstance(item, torch.Tensor | np.ndarray | np.generic):
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        reason = _secret_reason(item)
        if reason is not None:
            raise TypeError(f"{path}: {reason}; it must not be sent over the wire")
        if depth >= _MAX_DEPTH:
            raise TypeError(f"{path}: object graph deeper than {_MAX_DEPTH} levels; refusing to send it")
        children: list[tuple[Any, str]] = []
        if isinstance(item, Mapping):
            for key, value in item.items():
                children.append((key, f"{path}.keys()"))
                children.append((value, f"{path}[{key!r}]"))
        elif isinstance(item, list | tuple | set | frozenset):
            children.extend((value, f"{path}[{i}]") for i, value in enumerate(item))
        elif isinstance(item, BaseModel):
            children.extend((getattr(item, field), f"{path}.{field}") for field in type(item).model_fields)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            children.extend(
                (getattr(item, f.name), f"{path}.{f.name}") for f in dataclasses.fields(item) if hasattr(item, f.name)
            )
        elif not isinstance(item, _OPAQUE):
            # Plain objects (e.g. a participant that keeps a context as an attribute).
            attrs = getattr(item, "__dict__", None)
            if isinstance(attrs, dict):
                children.extend((value, f"{path}.{key}") for key, value in attrs.items())
            for slot in getattr(type(item), "__slots__", ()):
                if isinstance(slot, str) and hasattr(item, slot):
                    children.append((getattr(item, slot), f"{path}.{slot}"))
        stack.extend((child, child_path, depth + 1) for child, child_path in reversed(children))
    return obj


# ----- length-prefixed records -----------------------------------------------------------------
def length_prefixed(*parts: str | bytes | int) -> bytes:
    """Length-prefixed, unambiguous concatenation (for HKDF info, AEAD associated data and signed records):
    no two different part lists give the same bytes."""
    out = bytearray()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else str(part).encode() if isinstance(part, int) else part
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


def split_length_prefixed(data: bytes, n: int) -> list[bytes]:
    """Inverse of :func:`length_prefixed` for exactly ``n`` parts; truncated or trailing bytes are a ValueError."""
    parts, pos = [], 0
    for _ in range(n):
        if pos + 4 > len(data):
            raise ValueError("truncated length-prefixed record")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise ValueError("truncated length-prefixed record")
        parts.append(data[pos : pos + size])
        pos += size
    if pos != len(data):
        raise ValueError("trailing bytes after length-prefixed record")
    return parts
