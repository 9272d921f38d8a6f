"""Which privacy a federated config asks for, as the one key both ends' wrapper registries use.

``dp.level`` alone does not say it: the default ``level: client`` with ``mechanism: none`` is a run
without DP, and ``dp.clipping: adaptive`` changes what both ends do at client level. :func:`privacy_level`
folds the three into ``none | client | client-adaptive | sample``, so the server's
(:mod:`privlora.federated.dp_strategy`) and the client's (:mod:`privlora.federated.dp_client`) registries
are looked up by the same key and never disagree about what a config means.
"""

from __future__ import annotations

from typing import Literal

from privlora.config import FederatedConfig

Level = Literal["none", "client", "client-adaptive", "sample"]
LEVELS: tuple[Level, ...] = ("none", "client", "client-adaptive", "sample")


def privacy_level(config: FederatedConfig) -> Level:
    """``none`` without a mechanism, else ``dp.level`` (``client`` or ``sample``; ``client-adaptive`` for
    client level with ``dp.clipping: adaptive``)."""
    if config.dp.mechanism == "none":
        return "none"
    if config.dp.level == "client" and config.dp.clipping == "adaptive":
        return "client-adaptive"
    return config.dp.level
