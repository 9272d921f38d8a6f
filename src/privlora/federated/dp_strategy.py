"""Differential privacy on the server as wrappers around any strategy, the way Flower's
``DifferentialPrivacyServerSideFixedClipping`` wraps one: the LoRA strategy
(:class:`~privlora.federated.strategy.LoraStrategy`) knows nothing of DP, and a wrapper adds it.

A wrapper is itself a Flower ``Strategy``. It delegates every step to the strategy it wraps and adds
its own before or after:

* **sampling** — it installs its plan's ``sample`` as the inner strategy's ``sampler`` (the sampling
  its accountant assumes: Poisson for client-level DP; fixed-size without the clients whose budget is
  spent for sample-level DP);
* **instructions** — it adds the plan's per-round instructions (clip, noise std, …) to every FitIns
  the inner strategy returns, sized by the number of clients in that release (``group``);
* **checks** — it installs the plan's ``max_norm`` as the inner strategy's ``upload_bound``;
* **ledger** — it shows each round's replies to the plan before the inner strategy merges them
  (sample-level DP reads the clients' own ledgers there), records the round afterwards, puts ε in the
  round's metrics line (``round_log["epsilon"]``) and writes ``privacy.json`` after the last round.

Everything else (state, rule, ``decode_checked``, ``merge_uploads``, ``edge`` …) reads and writes
through to the inner strategy, so the workflows (SecAgg+, edges, FedBuff) drive a wrapped strategy as
they drive a plain one. The wrapper is chosen from the config by :func:`wrap_strategy`, keyed by
:func:`~privlora.federated.dp_level.privacy_level` (``none | client | client-adaptive | sample``) in
:data:`SERVER_WRAPPERS`. What an inner strategy must offer is :class:`Wrappable`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated.adaptive_plan import AdaptiveClippingPlan
from privlora.federated.dp_level import Level, privacy_level
from privlora.federated.privacy_plan import PrivacyPlan
from privlora.federated.sample_plan import SampleLevelPlan


class Wrappable(Protocol):
    """What a DP wrapper needs of the strategy inside it, besides Flower's ``Strategy`` methods: the
    two seams it replaces, the round's metrics line it adds ε to, and ``fit_ins`` (FedBuff sends work
    outside ``configure_fit``). ``aggregate_fit`` reports ``accepted`` in its metrics, and ``partial``
    when the round is not complete yet (one edge of a hierarchy)."""

    sampler: Callable[[Sequence[int], int], list[int]]
    upload_bound: Callable[[int], float | None]
    round_log: dict[str, Any]

    def fit_ins(self, server_round: int, group: int = 1) -> FitIns: ...


class PrivacyWrapper(Strategy):
    """Wraps ``strategy`` with the privacy plan ``plan_type`` builds from the config (see the module
    docstring for what it adds at each step). Attributes it does not own pass through to ``strategy``."""

    plan_type: ClassVar[Callable[[FederatedConfig], Any]] = PrivacyPlan
    _own = frozenset({"inner", "privacy", "config", "workdir"})

    def __init__(self, strategy: Any, config: FederatedConfig, workdir: Path) -> None:
        self.inner = strategy
        self.config = config
        self.workdir = Path(workdir)
        self.privacy = type(self).plan_type(config)
        strategy.sampler = self.privacy.sample
        strategy.upload_bound = self.privacy.max_norm

    # --- transparency: everything not privacy is the inner strategy's ----------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in PrivacyWrapper._own:  # not set yet (during __init__): no recursion through inner
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in PrivacyWrapper._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    # --- Strategy interface --------------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def with_instructions(self, ins: FitIns, server_round: int, group: int) -> FitIns:
        """``ins`` plus the plan's instructions for a release summing ``group`` clients."""
        return FitIns(ins.parameters, {**ins.config, **self.privacy.instructions(server_round, group)})

    def fit_ins(self, server_round: int, group: int = 1) -> FitIns:
        return self.with_instructions(self.inner.fit_ins(server_round, group), server_round, group)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The inner strategy's choice (made by the plan's sampler), each FitIns with the plan's
        instructions; the clients returned together are one release (the round's, or one edge's)."""
        picked = self.inner.configure_fit(server_round, parameters, client_manager)
        extended: dict[int, FitIns] = {}  # the clients shared one FitIns: keep them sharing one
        for _, ins in picked:
            if id(ins) not in extended:
                extended[id(ins)] = self.with_instructions(ins, server_round, len(picked))
        return [(proxy, extended[id(ins)]) for proxy, ins in picked]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.privacy.observe(results)  # sample-level DP: each client's round, before any rejection
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if not metrics.get("partial"):
            accepted = int(metrics.get("accepted", len(results)))
            log = self.inner.round_log
            log["epsilon"] = self.privacy.record(server_round, accepted, planned=int(log.get("sampled", accepted)))
        return parameters, metrics

    def merge_edges(self, server_round: int) -> tuple[int, list[tuple[int, int]]]:
        """The inner strategy's cloud merge, then the round in the ledger at its weakest edge's noise."""
        accepted, groups = self.inner.merge_edges(server_round)
        self.inner.round_log["epsilon"] = self.privacy.record(server_round, accepted, groups=groups)
        return accepted, groups

    def close_round(self, server_round: int, accepted: int = 0) -> None:
        """Make sure the round is in the ledger (later calls for it change nothing). A round with nobody
        sampled (a Poisson draw can be empty) or a SecAgg+ round that halted (fewer than 2 clients)
        never reaches ``aggregate_fit``: the global state stays as it was, and the round still counts."""
        self.inner.round_log["epsilon"] = self.privacy.record(server_round, accepted)

    def secagg_clipping_range(self) -> float:
        """SecAgg+'s per-value range under this plan (widened under Gaussian client-level DP)."""
        return float(self.privacy.secagg_clipping_range())

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Close the round in the ledger, let the inner strategy evaluate (its metrics line carries ε),
        and after the last round write ``privacy.json``."""
        if server_round > 0:
            self.close_round(server_round)
        else:
            self.inner.round_log["epsilon"] = self.privacy.spent()
        out = self.inner.evaluate(server_round, parameters)
        if server_round == self.config.rounds:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "privacy.json").write_text(json.dumps(self.privacy.report(), indent=2) + "\n")
        return out


#: dp level → the wrapper that adds it (:func:`register` fills it)
SERVER_WRAPPERS: dict[Level, type[PrivacyWrapper]] = {}


def register(level: Level) -> Callable[[type[PrivacyWrapper]], type[PrivacyWrapper]]:
    def add(cls: type[PrivacyWrapper]) -> type[PrivacyWrapper]:
        SERVER_WRAPPERS[level] = cls
        return cls

    return add


@register("none")
class NoDP(PrivacyWrapper):
    """No DP: fixed-size rounds, nothing asked of the clients but ``mechanism: none``, uploads bounded
    by ``max_update_norm`` only; privacy.json says so. Aggregates are the inner strategy's, bit for bit."""


@register("client")
class ClientLevelFixedClipping(PrivacyWrapper):
    """Client-level DP-FedAvg (McMahan et al. 2018): Poisson client sampling, every client told to clip
    its whole update to ``dp.clip`` and add the plan's noise (local σC or distributed σC/√n), uploads
    over clip + noise bound rejected, the RDP (or Laplace) ledger over rounds."""


@register("client-adaptive")
class ClientLevelAdaptiveClipping(PrivacyWrapper):
    """Client-level DP-FedAvg with adaptive clipping (Andrew et al. 2021; Flower's
    ``DifferentialPrivacyClientSideAdaptiveClipping`` shape): as the fixed clip, but every round's clip
    follows the noisy share of clients whose update fit under it, and the ledger counts the effective
    noise multiplier of updates and bits together."""

    plan_type = AdaptiveClippingPlan


@register("sample")
class SampleLevelBudget(PrivacyWrapper):
    """Sample-level DP (DP-SGD inside every client): fixed-size rounds that skip clients whose
    reported ledger says one more round would pass ``dp.budget``, and per-client ledgers rebuilt from
    the clients' reports."""

    plan_type = SampleLevelPlan

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The round without the clients that refused it (counted in the round's ``refused``)."""
        kept = self.privacy.drop_refusals(results)
        refused = len(results) - len(kept)
        log = self.inner.round_log  # one call per edge in a hierarchy: the round's count is their sum
        log["refused"] = log.get("refused", 0) + refused if getattr(self.inner, "edge", None) else refused
        return super().aggregate_fit(server_round, kept, failures)


def wrap_strategy(config: FederatedConfig, strategy: Any, workdir: Path) -> PrivacyWrapper:
    """``strategy`` wrapped with the privacy ``config`` asks for."""
    level = privacy_level(config)
    try:
        wrapper = SERVER_WRAPPERS[level]
    except KeyError:
        raise UserError(f"no server-side wrapper for dp level {level!r}; known: {', '.join(SERVER_WRAPPERS)}") \
            from None
    return wrapper(strategy, config, workdir)


def build_strategy(config: FederatedConfig, workdir: Path) -> PrivacyWrapper:
    """The server's strategy for a run: the plain LoRA strategy inside the configured privacy wrapper."""
    from privlora.federated.strategy import LoraStrategy

    return wrap_strategy(config, LoraStrategy(config, workdir), workdir)
