"""glue: brokerless publish/subscribe over UDP.

Endpoints on one layer-2 segment (or a Kubernetes cluster, through a unicast rendezvous) find each
other by periodic announcements and exchange data without a broker. Start with
:class:`EndpointManager` (blocking) or :class:`AsyncEndpointManager` (asyncio)::

    from glue import EndpointManager

    with EndpointManager.from_env() as endpoint:
        print(endpoint.wait_for_peers(1, timeout=5))
"""

from __future__ import annotations

import logging

from glue.errors import (
    BackpressureError,
    ConfigError,
    DecodeError,
    DeliveryError,
    GlueError,
    ProtocolError,
    UsageError,
)
from glue.events import MessageReceived, Peer, PeerAdded, PeerEvent, PeerRemoved
from glue.manager import AsyncEndpointManager, EndpointManager
from glue.settings import GlueSettings, load_settings

__all__ = [
    "AsyncEndpointManager",
    "BackpressureError",
    "ConfigError",
    "DecodeError",
    "DeliveryError",
    "EndpointManager",
    "GlueError",
    "GlueSettings",
    "MessageReceived",
    "Peer",
    "PeerAdded",
    "PeerEvent",
    "PeerRemoved",
    "ProtocolError",
    "UsageError",
    "load_settings",
]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
