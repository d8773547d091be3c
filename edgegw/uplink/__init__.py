"""The uplink: outbox records to the cloud broker over MQTT with mutual TLS (`uplink.client`: edgegw's own asyncio
client by default, or paho-mqtt driven by asyncio)."""

from edgegw.uplink.paho_bridge import Uplink, UplinkState

__all__ = ["Uplink", "UplinkState"]
