"""The Ray actor that runs fedctx's ClientApp in a simulation worker process.

Flower 1.41's Ray backend creates its client actors from
``flwr.simulation.ray_transport.ray_actor.ClientAppActor``; a worker process that unpickles that
class imports the ``flwr.simulation`` package, whose ``__init__`` brings in Flower's whole
SuperLink (SQLAlchemy, Alembic, FastAPI): 0.9 CPU s in every worker at start-up, none of it used
by a client. :func:`fedctx.federated.engine.run_on_ray` hands Flower this class instead (same
name, shown in process titles as ``ray::ClientAppActor``; same contract: ``run`` and
``terminate``, the same exceptions), which imports only Ray and Flower's ClientApp module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import ray
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp


@ray.remote
class ClientAppActor:
    """Runs one client's message through the ClientApp that ``client_app_fn`` loads.

    ``run`` returns ``(cid, reply, context)``; a failure to load the app is raised as is, any
    other exception of the app as Flower's ``ClientAppException`` (which the backend turns into
    that client's failure).
    """

    def __init__(self, on_actor_init_fn: Callable[[], None] | None = None) -> None:
        if on_actor_init_fn:
            on_actor_init_fn()

    def terminate(self) -> None:
        ray.actor.exit_actor()

    def run(self, client_app_fn: Callable[[], ClientApp], message: Message, cid: str,
            context: Context) -> tuple[str, Message, Context]:
        try:
            reply = client_app_fn()(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as err:
            raise ClientAppException(str(err)) from err
        return cid, reply, context
