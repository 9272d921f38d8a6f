"""The Flower apps: one ``ServerApp`` and one ``ClientApp`` for every engine.

Simulation builds them in-process with :func:`server_app_for` / :func:`client_app_for` (the config is
captured). The deployment engine imports the module-level ``server_app`` / ``client_app`` (or
``secagg_client_app``) inside Flower's own processes; those read the run's config from the run config
key ``privlora-config`` (JSON of a ``FederatedConfig``) and the output folder from ``privlora-workdir``.

The round itself is Flower's ``DefaultWorkflow``. Its fit step is either Flower's ``SecAggPlusWorkflow``
(secure aggregation) or :class:`TimedFitWorkflow` — the default fit step with a reply deadline, so a
client that vanished mid-round (a killed SuperNode) costs one timeout, not the whole run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import flwr.compat.common.recorddict_compat as compat  # Flower's record ↔ legacy converters
from flwr.client import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, Context, FitRes, Message, MessageType
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from privlora.config import FederatedConfig

CONFIG_KEY = "privlora-config"
PULL_SECONDS = 0.5  # between polls for replies (Flower's own loop: 3 s deployed, 0.1 s in simulation)
WORKDIR_KEY = "privlora-workdir"


class TimedFitWorkflow:
    """Flower's default fit step, with ``timeout`` on the replies (clients that miss it are failures)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def __call__(self, grid: Grid, context: Context) -> None:
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        ctx = cast(LegacyContext, context)
        current_round = cast(int, ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        parameters = compat.arrayrecord_to_parameters(ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        instructions = ctx.strategy.configure_fit(server_round=current_round, parameters=parameters,
                                                  client_manager=ctx.client_manager)
        if not instructions:
            return
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        out = [Message(content=compat.fitins_to_recorddict(ins, True), dst_node_id=proxy.node_id,
                       message_type=MessageType.TRAIN, group_id=str(current_round))
               for proxy, ins in instructions]
        sent, replies = push_and_pull(grid, out, proxies, self.timeout)
        results, failures = sort_replies(sent, replies, self.timeout)
        new_parameters, metrics = ctx.strategy.aggregate_fit(current_round, results, failures)
        if new_parameters:
            ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(new_parameters, True)
            ctx.history.add_metrics_distributed_fit(server_round=current_round, metrics=metrics)


def push_and_pull(grid: Grid, out: list[Message], proxies: Mapping[int, ClientProxy],
                  timeout: float) -> tuple[dict[str, ClientProxy], list[Message]]:
    """Flower's ``send_and_receive``, keeping what it drops: the id the SuperLink gave each message
    (replies name it in ``reply_to_message_id``; the deployment grid's ids come back from the SuperLink,
    they are not the ones on our objects). A message that could not be pushed gets a key no reply
    has, so it counts as one unanswered client."""
    ids = list(grid.push_messages(out))
    sent = {(mid or f"unsent:{m.metadata.dst_node_id}"): proxies[m.metadata.dst_node_id]
            for mid, m in zip(ids, out, strict=True)}
    waiting = {mid for mid in ids if mid}
    replies: list[Message] = []
    end = time.monotonic() + timeout
    while waiting and time.monotonic() < end:
        got = list(grid.pull_messages(list(waiting)))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            time.sleep(PULL_SECONDS)
    return sent, replies


def sort_replies(sent: Mapping[str, ClientProxy], replies: Iterable[Message],
                 timeout: float) -> tuple[list[tuple[ClientProxy, FitRes]], list[Any]]:
    """One outcome per message sent (``sent``: message id → the client it went to): a result, or one
    failure. Replies are matched by ``reply_to_message_id``, never by sender: the SuperLink answers for
    a node it has lost (``NODE_UNAVAILABLE``) with an error reply whose sender is the SuperLink itself,
    so matching by sender counted a killed SuperNode twice (that error and a "did not answer").
    Replies to messages not in ``sent``, and repeated replies, are ignored."""
    results: list[tuple[ClientProxy, FitRes]] = []
    failures: list[Any] = []
    answered: set[str] = set()
    for msg in replies:
        mid = msg.metadata.reply_to_message_id
        if mid not in sent or mid in answered:
            continue
        answered.add(mid)
        proxy = sent[mid]
        if msg.has_content():
            res = compat.recorddict_to_fitres(msg.content, False)
            (results if res.status.code == Code.OK else failures).append((proxy, res))
        else:
            failures.append(Exception(f"node {proxy.node_id}: {msg.error.reason} (code {msg.error.code})"))
    failures += [TimeoutError(f"node {proxy.node_id} did not answer in {timeout:.0f} s")
                 for mid, proxy in sent.items() if mid not in answered]
    return results, failures


class EdgeSecAggWorkflow:
    """Client → edge → cloud with SecAgg+ inside every edge: one SecAgg+ protocol per edge (each edge
    learns only its region's sum), then the cloud averages the edges' means."""

    def __init__(self, config: FederatedConfig, inner: Any) -> None:
        self.config = config
        self.inner = inner

    def __call__(self, grid: Grid, context: Context) -> None:
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

        ctx = cast(LegacyContext, context)
        strategy = ctx.strategy
        current_round = cast(int, ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        try:
            for edge in range(self.config.hierarchy.edges):
                strategy.edge = edge
                self.inner(grid, context)
        finally:
            strategy.edge = None
        strategy.merge_edges(current_round)


def fit_workflow(config: FederatedConfig, clipping_range: float | None = None) -> Any:
    """The round's fit step; ``clipping_range``: SecAgg+'s value range (the plan's, widened under DP)."""
    if config.secagg.enabled and config.hierarchy.edges:
        return EdgeSecAggWorkflow(config, _secagg_workflow(config, clipping_range))
    if config.secagg.enabled:
        return _secagg_workflow(config, clipping_range)
    return TimedFitWorkflow(config.round_timeout)


def _secagg_workflow(config: FederatedConfig, clipping_range: float | None = None) -> Any:
    from privlora.federated import secagg

    s = config.secagg
    # SecAgg+ scales each upload by samples / max_weight before quantising it over ±clipping_range;
    # clients undo that scaling on their distributed noise with the same max_weight (federated/secagg.py)
    max_weight = secagg.max_weight(config)
    shares: int | float = int(s.num_shares) if s.num_shares >= 3 else float(min(s.num_shares, 1.0))
    threshold: int | float = int(s.reconstruction_threshold) if s.reconstruction_threshold > 1 \
        else float(s.reconstruction_threshold)
    return SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                              max_weight=max_weight,
                              clipping_range=s.clipping_range if clipping_range is None else clipping_range,
                              quantization_range=s.quantization_range, timeout=s.timeout)


def run_server(grid: Grid, context: Context, config: FederatedConfig, workdir: Path) -> None:
    """The server's whole job: ``rounds`` rounds of the configured workflow."""
    from privlora.federated.dp_strategy import build_strategy

    strategy = build_strategy(config, workdir)  # the LoRA strategy inside the configured privacy wrapper
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.rounds), strategy=strategy)
    if config.asynchronous.enabled:
        from privlora.federated.buffered import run_buffered

        run_buffered(grid, legacy, strategy, config)
    else:
        DefaultWorkflow(fit_workflow=fit_workflow(config, strategy.secagg_clipping_range()))(grid, legacy)


def server_app_for(config: FederatedConfig, workdir: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, config, workdir)

    return app


def _client_fn(config: FederatedConfig | None):
    def client_fn(context: Context) -> Any:
        from privlora.federated.client import LoraClient

        cfg = config if config is not None else config_from(context.run_config)
        return LoraClient(cfg, int(context.node_config["partition-id"]), context.state).to_client()

    return client_fn


def client_app_for(config: FederatedConfig) -> ClientApp:
    return ClientApp(client_fn=_client_fn(config), mods=[secaggplus_mod] if config.secagg.enabled else [])


def config_from(run_config: dict[str, Any]) -> FederatedConfig:
    return FederatedConfig.model_validate(json.loads(str(run_config[CONFIG_KEY])))


# --- deployment engine entry points (Flower imports these by "module:attribute") ---------------------
server_app = ServerApp()


@server_app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    run_server(grid, context, config_from(context.run_config), Path(str(context.run_config[WORKDIR_KEY])))


client_app = ClientApp(client_fn=_client_fn(None))
secagg_client_app = ClientApp(client_fn=_client_fn(None), mods=[secaggplus_mod])
