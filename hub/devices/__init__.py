"""The device endpoint (/v1/device, docs/protocol.md).

`_session` is the hub's end of a device session, sans-I/O: hello, welcome, resends, the window, the error budget, acks,
command offers. `_server` drives one per connection with the WebSocket, the ingest pipeline and trio's clock.
"""

from hub.devices._server import DeviceServer, DeviceSession
from hub.devices._session import Close, HubConnection, HubEvent, Refused, Resent

__all__ = ["Close", "DeviceServer", "DeviceSession", "HubConnection", "HubEvent", "Refused", "Resent"]
