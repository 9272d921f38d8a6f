"""Differential privacy in the client as wrappers around its plain local round, as on the server
(:mod:`privlora.federated.dp_strategy`): :class:`~privlora.federated.client.PlainRound` trains and
releases the upload as it is, and a wrapper adds DP around it.

A local round has two steps a wrapper may take over (:class:`LocalRound`):

* ``train(task, data, seed)`` — the local steps; returns the mean loss and metrics to report;
* ``release(upload, instructions, weight)`` — what happens to the difference before it is encoded;
  returns the upload and its norm before any clipping;
* ``released_metrics(norm, loss)`` — what the reply may say besides the upload: the plain round reports
  the norm and its training loss; under DP neither (each is a function of the client's data that no noise
  covers): client-level adaptive clipping reports only its noisy clipped bit.

:class:`ClientLevelClipping` (``dp.level: client``) releases the inner round's upload clipped and
noised as the server's instructions say (noise from OS entropy: a seeded stream would be predictable
from the config). :class:`SampleLevelDPSGD` (``dp.level: sample``) trains with DP-SGD instead (Opacus,
through :mod:`privlora.federated.sample_dp`: the client's own ledger, refusal past ``dp.budget``) and
releases the inner round's upload untouched — it is post-processing of DP-SGD's output. Without DP the
plain round is used as it is. :class:`AdaptiveClientClipping` (``dp.clipping: adaptive``) is client-level
clipping at the round's current clip that also reports ``1[‖Δ‖ ≤ C] − ½`` plus its own Gaussian noise
(:mod:`privlora.federated.adaptive_clip`). :func:`wrap_round` picks the wrapper by the same key as the
server.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated import adaptive_clip, client_privacy, sample_dp
from privlora.federated.dp_level import Level, privacy_level


class LocalRound(Protocol):
    """One client's round, the part privacy may change."""

    def train(self, task: Any, data: Any, seed: int) -> tuple[float, dict[str, float]]: ...

    def release(self, upload: list[np.ndarray], instructions: dict[str, Any],
                weight: float) -> tuple[list[np.ndarray], float]: ...

    def released_metrics(self, norm: float, loss: float) -> dict[str, float]: ...


def os_rng() -> np.random.Generator:
    """A generator seeded from OS entropy: noise nobody can recompute from the config."""
    return np.random.default_rng(secrets.randbits(128))


def privatize(upload: list[np.ndarray], instructions: dict[str, Any], weight: float = 1.0,
              rng: np.random.Generator | None = None) -> tuple[list[np.ndarray], float]:
    """Clip and noise one upload as the server's round instructions say; returns it and its raw norm.

    ``weight``: the factor secure aggregation will multiply this upload by (:func:`secagg.upload_factor`).
    Distributed noise is divided by it, so that after the multiplication this client's noise still has
    the std the server asked for and the secure sum carries σC (see :mod:`privlora.federated.secagg`).
    Local noise is not: each upload is private on its own, and the weighting is post-processing.
    ``rng``: the noise's source (default :func:`os_rng`; tests pass a seeded one to check the formula)."""
    mechanism = str(instructions.get("mechanism", "none"))
    rng = os_rng() if rng is None else rng
    if mechanism == "gaussian":
        clipped, norm = client_privacy.clip_l2(upload, float(instructions["clip"]))
        std = float(instructions["noise_std"])
        if instructions.get("placement") == "distributed":
            if not (math.isfinite(weight) and weight > 0):
                raise UserError(f"the secure-aggregation weight must be a positive number, got {weight}")
            std /= weight
        return client_privacy.add_gaussian(clipped, std, rng), norm
    if mechanism == "laplace":
        clipped, norm = client_privacy.clip_l1(upload, float(instructions["clip"]))
        return client_privacy.add_laplace(clipped, float(instructions["laplace_scale"]), rng), norm
    return upload, client_privacy.l2_norm(upload)


class ClientLevelClipping:
    """Client-level DP-FedAvg on the client: the inner round's upload, clipped to the server's ``clip``
    and noised (Gaussian std or Laplace scale from the instructions); training is the inner round's."""

    def __init__(self, inner: LocalRound, rng: Callable[[], np.random.Generator] = os_rng) -> None:
        self.inner = inner
        self.rng = rng

    def train(self, task: Any, data: Any, seed: int) -> tuple[float, dict[str, float]]:
        return self.inner.train(task, data, seed)

    def release(self, upload: list[np.ndarray], instructions: dict[str, Any],
                weight: float) -> tuple[list[np.ndarray], float]:
        released, _ = self.inner.release(upload, instructions, weight)
        return privatize(released, instructions, weight, self.rng())

    def released_metrics(self, norm: float, loss: float) -> dict[str, float]:
        return {}  # a clear norm or loss is not covered by the noise: the server must not see them


class AdaptiveClientClipping(ClientLevelClipping):
    """Client-level DP with adaptive clipping (Andrew et al. 2021): the release of
    :class:`ClientLevelClipping` at the round's clip ``C``, and the bit ``1[‖Δ‖ ≤ C] − ½`` with the
    count noise ``N(0, σ_b²)`` the server asked for, which is all the reply says about the norm."""

    def __init__(self, inner: LocalRound, rng: Callable[[], np.random.Generator] = os_rng) -> None:
        super().__init__(inner, rng)
        self.bit: float | None = None

    def release(self, upload: list[np.ndarray], instructions: dict[str, Any],
                weight: float) -> tuple[list[np.ndarray], float]:
        released, norm = super().release(upload, instructions, weight)
        if adaptive_clip.COUNT_STD_KEY not in instructions:
            raise UserError("the server asked for adaptive clipping without the count noise; refusing to report "
                            "a clear clipped bit")
        self.bit = adaptive_clip.noisy_bit(norm, float(instructions["clip"]),
                                           float(instructions[adaptive_clip.COUNT_STD_KEY]), self.rng())
        return released, norm

    def released_metrics(self, norm: float, loss: float) -> dict[str, float]:
        return {} if self.bit is None else {adaptive_clip.BIT_KEY: self.bit}


class SampleLevelDPSGD:
    """Sample-level DP: ``client.local_steps`` DP-SGD steps (Opacus) instead of the inner round's
    training, with the client's ledger in ``state`` (Flower's per-node ``Context.state``); the upload is
    released as the inner round releases it (post-processing, no second noise)."""

    def __init__(self, inner: LocalRound, config: FederatedConfig, state: Any = None) -> None:
        self.inner = inner
        self.config = config
        self.state = state

    def train(self, task: Any, data: Any, seed: int) -> tuple[float, dict[str, float]]:
        return sample_dp.train_round(task, data, self.config, self.state)  # refuses past the budget

    def release(self, upload: list[np.ndarray], instructions: dict[str, Any],
                weight: float) -> tuple[list[np.ndarray], float]:
        return self.inner.release(upload, instructions, weight)

    def released_metrics(self, norm: float, loss: float) -> dict[str, float]:
        return {}  # the loss of the clear batches is not DP-SGD's output: keep it (and the norm) local


#: dp level → how a client's plain round is wrapped (inner round, config, Context.state)
CLIENT_WRAPPERS: dict[Level, Callable[[LocalRound, FederatedConfig, Any], LocalRound]] = {
    "none": lambda inner, config, state: inner,
    "client": lambda inner, config, state: ClientLevelClipping(inner),
    "client-adaptive": lambda inner, config, state: AdaptiveClientClipping(inner),
    "sample": lambda inner, config, state: SampleLevelDPSGD(inner, config, state),
}


def wrap_round(config: FederatedConfig, inner: LocalRound, state: Any = None) -> LocalRound:
    """``inner`` wrapped with the privacy ``config`` asks for (``state``: the client's Context.state)."""
    level = privacy_level(config)
    try:
        wrap = CLIENT_WRAPPERS[level]
    except KeyError:
        raise UserError(f"no client-side wrapper for dp level {level!r}; known: {', '.join(CLIENT_WRAPPERS)}") \
            from None
    return wrap(inner, config, state)
