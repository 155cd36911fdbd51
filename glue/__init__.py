"""glue: brokerless publish/subscribe over UDP.

Endpoints on one layer-2 segment (or a Kubernetes cluster, through a unicast rendezvous) find each
other by periodic announcements and exchange data without a broker. Start with
:class:`EndpointManager` (blocking) or :class:`AsyncEndpointManager` (asyncio)::

    from glue import EndpointManager

    with EndpointManager.from_env() as endpoint:
        endpoint.subscribe("sensors/#", "reading", lambda message: print(message.json()))
        endpoint.publish_json("sensors/kitchen", "reading", {"celsius": 21.5})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glue.errors import (
    BackpressureError,
    ConfigError,
    DecodeError,
    DeliveryError,
    GlueError,
    NoResponderError,
    ProtocolError,
    RemoteError,
    UnknownPeerError,
    UsageError,
    UsageTypeError,
    UsageValueError,
)
from glue.events import (
    Gap,
    Message,
    MessageReceived,
    Peer,
    PeerAdded,
    PeerEvent,
    PeerRemoved,
    Reply,
    Request,
    StopReport,
)
from glue.manager import AsyncEndpointManager, EndpointManager
from glue.service import AsyncService, Service
from glue.settings import GlueSettings, load_settings
from glue.subscription import AsyncSubscription, Subscription

if TYPE_CHECKING:
    from glue.model import AsyncModel, Model, ModelChange

__all__ = [
    "AsyncEndpointManager",
    "AsyncModel",
    "AsyncService",
    "AsyncSubscription",
    "BackpressureError",
    "ConfigError",
    "DecodeError",
    "DeliveryError",
    "EndpointManager",
    "Gap",
    "GlueError",
    "GlueSettings",
    "Message",
    "MessageReceived",
    "Model",
    "ModelChange",
    "NoResponderError",
    "Peer",
    "PeerAdded",
    "PeerEvent",
    "PeerRemoved",
    "ProtocolError",
    "RemoteError",
    "Reply",
    "Request",
    "Service",
    "StopReport",
    "Subscription",
    "UnknownPeerError",
    "UsageError",
    "UsageTypeError",
    "UsageValueError",
    "load_settings",
]
__version__ = "0.1.0"

# No NullHandler: an application that configures no logging still sees glue's warnings (each
# cause once: a type mismatch, a message nobody subscribes to any more, a misspelt setting)
# through the standard library's last-resort handler on stderr, instead of losing them
# silently. Configure logging (or set the ``glue`` logger's level) to route or hide them.

_MODEL_NAMES = frozenset({"AsyncModel", "Model", "ModelChange"})


def __getattr__(name: str) -> Any:
    """The model names, imported on first use: ``import glue`` does not pay for pycrdt."""
    if name in _MODEL_NAMES:
        import glue.model

        return getattr(glue.model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
