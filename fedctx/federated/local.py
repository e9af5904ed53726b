"""An in-process grid: runs a ``ClientApp`` directly, one message after another, without Ray.

Used by ``--backend inprocess`` (debugging, profiling, exact comparison with the Ray path) and by
the tests. It honours the Message API contract the server relies on: ``get_node_ids``,
``send_and_receive`` returning one reply per message that was answered in time, error replies
for clients that raise, and no reply for a client still running when ``timeout`` expires.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

CLIENT_EXCEPTION = 1


class ClientCancelled(BaseException):
    """Raised inside a client that runs past its timeout; a ``BaseException`` so that the
    client's own ``except Exception`` does not swallow it."""


def _raise_in(thread_id: int) -> None:
    """Raise :class:`ClientCancelled` in thread ``thread_id`` at its next Python instruction
    (a call into C, e.g. a sleep, finishes first)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(ClientCancelled))


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

    def _handle(self, msg: Message) -> Message:
        """The node's reply to ``msg``; an exception becomes an error reply."""
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:  # noqa: BLE001 - a failing client becomes an error reply
            return Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                           reply_to=msg)

    def _handle_within(self, msg: Message, timeout: float) -> Message | None:
        """:meth:`_handle` in this thread, cancelled (``None``: no reply) if it is still
        running ``timeout`` seconds after it began. A timer raises :class:`ClientCancelled` in
        this thread, under a lock with the "done" flag, so it never lands outside this call."""
        caller, lock, done = threading.get_ident(), threading.Lock(), []

        def expire() -> None:
            with lock:
                if not done:
                    _raise_in(caller)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        try:
            timer.start()
            try:
                reply = self._handle(msg)
            finally:
                with lock:
                    done.append(True)
            timer.cancel()
            return reply
        except ClientCancelled:
            return None

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        """Run the messages one after another, in this thread. With ``timeout``, each client
        has ``timeout`` seconds from its own start (they would run side by side on separate
        machines): one still running then is cancelled at its next Python instruction and gives
        no reply, as a hung node gives none in Flower's grids. (A client blocked inside one long
        call into C, e.g. a sleep, is cancelled when that call returns.)"""
        if timeout is None:
            return [self._handle(msg) for msg in messages]
        replies = [self._handle_within(msg, timeout) for msg in messages]
        return [r for r in replies if r is not None]
