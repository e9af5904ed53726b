"""An in-process grid: runs a ``ClientApp`` directly, one message after another, without Ray.

Used by ``--backend inprocess`` (debugging, profiling, exact comparison with the Ray path) and by
the tests. It honours the Message API contract the server relies on: ``get_node_ids``,
``send_and_receive`` returning one reply per message, error replies for clients that raise.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

CLIENT_EXCEPTION = 1


class InProcessGrid:
    """A grid of ``num_clients`` nodes whose ClientApp runs in this process.

    Node ids are ``1000 + partition_id``; each node keeps its own ``Context`` (and so its
    ``context.state``) across rounds, as a SuperNode does.
    """

    def __init__(self, client_app: ClientApp, num_clients: int, run_id: int = 1,
                 run_config: dict | None = None) -> None:
        self.client_app = client_app
        self.run_id = run_id
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 1  # the server side of the grid
        TaskIdentity.task_id = 1
        self.contexts = {
            1000 + pid: Context(run_id=run_id, node_id=1000 + pid,
                                node_config={"partition-id": pid, "num-partitions": num_clients},
                                state=RecordDict(), run_config=dict(run_config or {}))
            for pid in range(num_clients)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in messages:
            try:
                reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - a failing client becomes an error reply
                reply = Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                                reply_to=msg)
            replies.append(reply)
        return replies
