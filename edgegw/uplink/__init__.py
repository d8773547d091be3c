"""The uplink: outbox records to the cloud broker over MQTT with mutual TLS (paho-mqtt driven by asyncio)."""

from edgegw.uplink.paho_bridge import Uplink, UplinkState

__all__ = ["Uplink", "UplinkState"]
