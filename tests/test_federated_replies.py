"""One outcome per client per round: the fit step's reply sorting on real Flower messages, including the
error reply the SuperLink itself sends for a SuperNode it has lost (a killed one), which used to count
twice — once as that error, once as "did not answer"."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitIns, FitRes, Message, MessageType, Status, ndarrays_to_parameters
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, fitres_to_recorddict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from privlora.federated.app import sort_replies

PARAMS = ndarrays_to_parameters([np.zeros(3, np.float32)])


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch) -> None:
    """Messages are built inside a ServerApp process, which knows its run and task; so does this test."""
    for key, value in {"_run_id": 1, "_node_id": SUPERLINK_NODE_ID, "_task_id": 7}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def sent_messages(nodes: list[int]) -> tuple[dict[str, GridClientProxy], list[Message]]:
    """Fit messages to ``nodes`` with message ids (a grid's push returns them; replies name them)."""
    out = []
    for n in nodes:
        msg = Message(content=fitins_to_recorddict(FitIns(PARAMS, {"round": 1}), True), dst_node_id=n,
                      message_type=MessageType.TRAIN, group_id="1")
        msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grids stamp a pushed message
        out.append(msg)
    proxies = {n: GridClientProxy(n, None, 1) for n in nodes}  # type: ignore[arg-type]
    return {m.metadata.message_id: proxies[m.metadata.dst_node_id] for m in out}, out


def ok_reply(ins: Message, code: Code = Code.OK) -> Message:
    return Message(fitres_to_recorddict(FitRes(Status(code, ""), PARAMS, 10, {}), False), reply_to=ins)


def test_a_lost_supernode_is_one_failure_not_two() -> None:
    sent, out = sent_messages([11, 12, 13])
    # node 13 was killed: the SuperLink answers for it, from its own node id, with NODE_UNAVAILABLE
    lost = create_message_error_unavailable_res_message(out[2].metadata, "node_unavail")
    assert lost.metadata.src_node_id != 13  # why matching replies by sender went wrong
    results, failures = sort_replies(sent, [ok_reply(out[0]), ok_reply(out[1]), lost], timeout=25)
    assert [p.node_id for p, _ in results] == [11, 12]
    assert len(failures) == 1 and "node 13" in str(failures[0])
    assert len(results) + len(failures) == len(sent)


def test_silent_failed_and_duplicate_replies_each_count_once() -> None:
    sent, out = sent_messages([1, 2, 3, 4])
    replies = [ok_reply(out[0]), ok_reply(out[0]),  # a repeated reply is ignored
               ok_reply(out[1], Code.FIT_NOT_IMPLEMENTED),  # answered, but not OK: a failure
               create_message_error_unavailable_res_message(out[2].metadata, "msg_unavail")]
    stray = ok_reply(sent_messages([99])[1][0])  # a reply to a message this round did not send
    results, failures = sort_replies(sent, [*replies, stray], timeout=25)
    assert [p.node_id for p, _ in results] == [1]
    assert len(failures) == 3  # node 2's status, node 3's error, node 4 silent
    assert isinstance(failures[-1], TimeoutError) and "node 4" in str(failures[-1])
    assert sort_replies(sent, [], timeout=5)[1] and len(sort_replies(sent, [], timeout=5)[1]) == 4
