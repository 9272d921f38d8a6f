"""Privacy accounting, on the ground floor (like ``opacus.accountants``): ε for a composition history
and σ for a target ε, used by DP-SGD (``train/``), client-level federated DP (``federated/``) and the
one-run audits (``audit/``).

It imports only the standard library, numpy and Opacus (and :mod:`privlora.errors`), never the layers
that use it — tests/test_privacy_package.py checks this — so every ε privlora publishes comes from one
sum and every σ from one bisection. Opacus (which imports torch) is loaded at the first ε, not here.

* :mod:`~privlora.privacy.history` — Segment (σ, q, steps), History (segments + sampling + neighbours);
* :mod:`~privlora.privacy.epsilon` — ε of a history by ``rdp`` / ``prv`` / ``gdp``, RDP ε per step;
* :mod:`~privlora.privacy.calibrate` — σ for a target ε (one bisection, two stopping rules);
* :mod:`~privlora.privacy.delta` — the default δ for N records.
"""

from privlora.privacy.calibrate import LEDGER, OPACUS, Bisection, TargetUnreachable, noise_multiplier, smallest_sigma
from privlora.privacy.delta import default_delta
from privlora.privacy.epsilon import ACCOUNTANTS, ORDERS, epsilon, rdp, running_epsilons
from privlora.privacy.history import (
    ADD_REMOVE,
    CLIENT_NEIGHBOURS,
    FIXED_SIZE,
    POISSON,
    REPLACE_ONE,
    SAMPLE_NEIGHBOURS,
    History,
    Segment,
)

__all__ = ["ACCOUNTANTS", "ADD_REMOVE", "CLIENT_NEIGHBOURS", "FIXED_SIZE", "LEDGER", "OPACUS", "ORDERS", "POISSON",
           "REPLACE_ONE", "SAMPLE_NEIGHBOURS", "Bisection", "History", "Segment", "TargetUnreachable",
           "default_delta", "epsilon", "noise_multiplier", "rdp", "running_epsilons", "smallest_sigma"]
