"""Which privacy a federated config asks for, as the one key both ends' wrapper registries use.

``dp.level`` alone does not say it: the default ``level: client`` with ``mechanism: none`` is a run
without DP. :func:`privacy_level` folds the two into ``none | client | sample``, so the server's
(:mod:`privlora.federated.dp_strategy`) and the client's (:mod:`privlora.federated.dp_client`) registries
are looked up by the same key and never disagree about what a config means.
"""

from __future__ import annotations

from typing import Literal

from privlora.config import FederatedConfig

Level = Literal["none", "client", "sample"]
LEVELS: tuple[Level, ...] = ("none", "client", "sample")


def privacy_level(config: FederatedConfig) -> Level:
    """``none`` without a mechanism, else ``dp.level`` (``client`` or ``sample``)."""
    if config.dp.mechanism == "none":
        return "none"
    return config.dp.level
