"""CKKS with TenSEAL: the parameters, the contexts, the encrypted vector and their bytes.

Approximate homomorphic encryption (Cheon, Kim, Kim & Song, "Homomorphic
Encryption for Arithmetic of Approximate Numbers", ASIACRYPT 2017) through
TenSEAL (Benaissa et al., "TenSEAL: A Library for Encrypted Tensor Operations
Using Homomorphic Encryption", 2021; https://github.com/OpenMined/TenSEAL),
which wraps Microsoft SEAL.

Who holds what (privacy.md, "Secure aggregation"):

* :class:`KeyHolderContext` holds the **secret key**. Only participants (the
  key-holder committee, by default all of them) have one. It encrypts, decrypts
  and opens sealed aggregates. It refuses to be pickled or copied, and
  :func:`securefl.crypto.assert_wire_safe` rejects it, so it cannot reach the
  transport by accident. Sharing the committee key is an explicit, named call:
  :meth:`KeyHolderContext.export_secret_for_committee`.
* :class:`PublicContext` is made with TenSEAL's ``make_context_public()``. The
  aggregator holds it: it can add ciphertexts and multiply them by plaintext
  scalars or vectors, but it cannot decrypt.
* The aggregator (:class:`securefl.layers.ckks_aggregator.CkksAggregator`)
  implements the aggregator interface that protocols use
  (``sum``/``mean``/``weighted_mean`` over reply messages) and returns a
  :class:`~securefl.core.sealed.SealedTensor` that the protocol forwards
  untouched and key holders open.

Modules
-------
params
    :class:`CkksParams`: ring, primes and scale, checked against 128-bit security (no TenSEAL).
wire
    The chunk and key-blob framing, and TenSEAL's protobuf messages rewritten by hand.
context
    :class:`KeyHolderContext`, :class:`PublicContext`, :func:`seal_tensor`.
vector
    :class:`EncryptedVector`: dense packing into ``N/2``-slot ciphertexts, and its wire chunks.

Names are loaded lazily (PEP 562), so ``from securefl.crypto.ckks import CkksParams`` does not
import TenSEAL (the configuration validates CKKS settings without it).

Threat model. The aggregator alone learns nothing about individual payloads
(semantic security of CKKS under RLWE). It does see the number of chunks,
hence the payload length. A participant holding the key could decrypt a peer's
intercepted ciphertext: channels must therefore be authenticated and encrypted
per pair, and distributed DP noise limits what any single ciphertext reveals.
CKKS decryption of an aggregate also leaks a little about the noise, and hence
about the secret key, to whoever sees the decrypted value (Li & Micciancio,
EUROCRYPT 2021): decrypted aggregates stay with the key holders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from securefl.core.lazy import lazy_attributes

_EXPORTS: dict[str, str] = {
    "CkksParams": ".params",
    "EncryptedVector": ".vector",
    "KeyHolderContext": ".context",
    "PublicContext": ".context",
    "SecretKeyRequired": ".context",
    "seal_tensor": ".context",
}

__all__ = [
    "CkksParams",
    "EncryptedVector",
    "KeyHolderContext",
    "PublicContext",
    "SecretKeyRequired",
    "seal_tensor",
]


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, __all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from securefl.crypto.ckks.context import KeyHolderContext, PublicContext, SecretKeyRequired, seal_tensor
    from securefl.crypto.ckks.params import CkksParams
    from securefl.crypto.ckks.vector import EncryptedVector
