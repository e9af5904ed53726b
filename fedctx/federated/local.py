"""An in-process grid: runs a ``ClientApp`` directly, one message after another, without Ray.

Used by ``--backend inprocess`` (debugging, profiling, exact comparison with the Ray path) and by
the tests. It honours the Message API contract the server relies on: ``get_node_ids``,
``send_and_receive`` returning one reply per message that was answered in time, error replies
for clients that raise, and no reply for a client still running when ``timeout`` expires.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

CLIENT_EXCEPTION = 1


class InProcessGrid:
    """A grid of ``num_clients`` nodes whose ClientApp runs in this process.

    Node ids are ``1000 + partition_id``; each node keeps its own ``Context`` (and so its
    ``context.state``) across rounds, as a SuperNode does, and handles one message at a time.
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
        self._busy: dict[int, threading.Lock] = {}  # node id -> held while it handles one

    def _handle(self, msg: Message) -> Message:
        """The node's reply to ``msg``; an exception becomes an error reply."""
        node = msg.metadata.dst_node_id
        with self._busy.setdefault(node, threading.Lock()):
            try:
                return self.client_app(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - a failing client becomes an error reply
                return Message(Error(code=CLIENT_EXCEPTION,
                                     reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        """Run the messages one after another. With ``timeout``, each client has ``timeout``
        seconds from its own start (they would run side by side on separate machines): one still
        running then gives no reply, as a hung node gives none in Flower's grids; it finishes in
        a daemon thread, and its node stays busy (later messages to it wait) until it does."""
        if timeout is None:
            return [self._handle(msg) for msg in messages]
        replies: list[Message] = []
        for msg in messages:
            box: list[Message] = []
            worker = threading.Thread(target=lambda m=msg, b=box: b.append(self._handle(m)),
                                      daemon=True)
            worker.start()
            worker.join(timeout)
            replies.extend(box)
        return replies
