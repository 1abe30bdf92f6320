"""securefl.crypto: CKKS, pairwise masking (SecAgg), Shamir sharing, keys and signing.

Submodules
----------
ckks
    TenSEAL CKKS: parameters, key-holder vs public contexts, dense packing and its wire format.
masking, shamir, fixedpoint
    Secure aggregation by pairwise masking (Bonawitz et al., CCS 2017): the session and the client.
signing
    Ed25519 message signatures and the replay-aware verifier.
sealed (``securefl.core.sealed``, re-exported)
    :class:`SealedTensor`: how an encrypted/masked tensor travels in a message.
wire
    :func:`assert_wire_safe`: keeps secret keys off the transport.

Names are loaded lazily (PEP 562), so ``from securefl.crypto import SealedTensor``
does not import TenSEAL or ``cryptography``; protocols may use the sealed-value
helpers without pulling in the crypto libraries.

The aggregators that combine sealed values are the server's side of secure aggregation
and live a floor up, in :mod:`securefl.layers` (``ckks_aggregator``, ``masking_aggregator``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from securefl.core.lazy import lazy_attributes

_EXPORTS: dict[str, str] = {
    # errors
    "CiphertextError": ".errors",
    "RejectedMessage": ".errors",
    "SecAggAbort": ".errors",
    "ShamirError": ".errors",
    # wire safety
    "SecretHolder": ".wire",
    "assert_wire_safe": ".wire",
    "holds_secret": ".wire",
    # sealed values
    "SealedTensor": "securefl.core.sealed",
    "Sealer": "securefl.core.sealed",
    "Opener": "securefl.core.sealed",
    "attach": "securefl.core.sealed",
    "is_sealed": "securefl.core.sealed",
    "open_field": "securefl.core.sealed",
    "open_sealed_fields": "securefl.core.sealed",
    "seal_field": "securefl.core.sealed",
    # CKKS
    "CkksParams": ".ckks",
    "EncryptedVector": ".ckks",
    "KeyHolderContext": ".ckks",
    "PublicContext": ".ckks",
    "SecretKeyRequired": ".ckks",
    "seal_tensor": ".ckks",
    # masking
    "ClientSecrets": ".masking",
    "FixedPoint": ".fixedpoint",
    "MaskingClient": ".masking",
    "MaskingSession": ".masking",
    "prg_stream": ".masking",
    # signing
    "MessageVerifier": ".signing",
    "PartyKeys": ".signing",
    "canonical_bytes": ".signing",
    "generate_signing_key": ".signing",
    "load_public_key": ".signing",
    "public_key_bytes": ".signing",
    "sign_message": ".signing",
}

__all__ = [
    "CiphertextError",
    "CkksParams",
    "ClientSecrets",
    "EncryptedVector",
    "FixedPoint",
    "KeyHolderContext",
    "MaskingClient",
    "MaskingSession",
    "MessageVerifier",
    "Opener",
    "PartyKeys",
    "PublicContext",
    "RejectedMessage",
    "SealedTensor",
    "Sealer",
    "SecAggAbort",
    "SecretHolder",
    "SecretKeyRequired",
    "ShamirError",
    "assert_wire_safe",
    "attach",
    "canonical_bytes",
    "generate_signing_key",
    "holds_secret",
    "is_sealed",
    "load_public_key",
    "open_field",
    "open_sealed_fields",
    "prg_stream",
    "public_key_bytes",
    "seal_field",
    "seal_tensor",
    "sign_message",
]


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, __all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from securefl.core.sealed import (
        Opener,
        SealedTensor,
        Sealer,
        attach,
        is_sealed,
        open_field,
        open_sealed_fields,
        seal_field,
    )
    from securefl.crypto.ckks import (
        CkksParams,
        EncryptedVector,
        KeyHolderContext,
        PublicContext,
        SecretKeyRequired,
        seal_tensor,
    )
    from securefl.crypto.errors import CiphertextError, RejectedMessage, SecAggAbort, ShamirError
    from securefl.crypto.fixedpoint import FixedPoint
    from securefl.crypto.masking import ClientSecrets, MaskingClient, MaskingSession, prg_stream
    from securefl.crypto.signing import (
        MessageVerifier,
        PartyKeys,
        canonical_bytes,
        generate_signing_key,
        load_public_key,
        public_key_bytes,
        sign_message,
    )
    from securefl.crypto.wire import SecretHolder, assert_wire_safe, holds_secret
