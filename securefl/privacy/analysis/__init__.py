"""Pure privacy mathematics: no state, no files, no ledgers.

Mirrors Opacus's split between ``accountants/analysis`` (functions) and
``accountants`` (objects). Everything here is a function of its arguments, so it
can be tested against published numbers and reused by the calibration, the
accountants and the audit alike.

- :mod:`.rdp`: Rényi DP of the (Poisson-subsampled) Gaussian mechanism and the
  RDP → (ε, δ) conversion (Mironov 2017; Mironov, Talwar & Zhang 2019;
  Balle et al. 2020), computed with Opacus's analysis functions.
- :mod:`.gaussian`: the exact (ε, δ) curve of the plain Gaussian mechanism
  (Balle & Wang 2018), used as a reference in tests.
- :mod:`.conversions`: how securefl's events map onto dp-accounting's and
  Opacus's conventions, and the noise arithmetic of distributed DP.
"""

from securefl.privacy.analysis.conversions import (
    dp_accounting_noise_multiplier,
    effective_noise_multiplier,
    top_up_std,
)
from securefl.privacy.analysis.gaussian import analytic_gaussian_delta, analytic_gaussian_epsilon
from securefl.privacy.analysis.rdp import (
    DEFAULT_ORDERS,
    rdp_gaussian,
    rdp_to_epsilon,
)

__all__ = [
    "DEFAULT_ORDERS",
    "analytic_gaussian_delta",
    "analytic_gaussian_epsilon",
    "dp_accounting_noise_multiplier",
    "effective_noise_multiplier",
    "rdp_gaussian",
    "rdp_to_epsilon",
    "top_up_std",
]
