"""Commands from the cloud down to devices (mixed into :class:`~edgegw.uplink.paho_bridge.Uplink`): which filters
the uplink subscribes to, which device a command topic names (``{prefix}/{id}/rest``, or tenant-aware through
``commands``), and the MQTT 5 properties a command carries down. Handed to ``downlink``
(``MQTTServer.deliver_downlink``); never raises into the client's read loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgegw.mqtt.packets import NO_PROPERTIES, Properties, PropertyId

if TYPE_CHECKING:
    from edgegw.config import UplinkSettings
    from edgegw.uplink.paho_bridge import Downlink


class Commands:
    """The downlink; the attributes are :class:`~edgegw.uplink.paho_bridge.Uplink`'s."""

    _settings: UplinkSettings
    _log: Any
    commands: Any
    downlink: Downlink | None
    commands_delivered: int
    commands_undeliverable: int
    _link: Any

    commands_held = False
    """Set by the daemon until the device servers restored their persistent sessions (:meth:`release_commands`):
    no command subscription before. A command taken earlier finds no session, is acknowledged upstream and counted
    undeliverable, although its device has a persistent session that will be back a moment later."""

    def release_commands(self) -> None:
        """The sessions are restored: subscribe to commands now, on the current connection if it is up (otherwise
        at the next CONNACK, as always)."""
        self.commands_held = False
        link = self._link
        if link is not None and link.connack.done() and link.connack.result() is None and not link.lost.done():
            link._subscribe_commands()

    def _on_command(self, topic: str, payload: bytes, qos: int, retain: bool, props: Properties) -> None:
        """A message on ``command_topic`` (on the loop thread, from the client's read): ``{prefix}/{id}/rest``
        goes to device ``id`` as ``devices/{id}/rest``. Never raises: the read loop must go on."""
        try:
            problem = None
            device_id = rest = device_topic = ""
            prefix = self._settings.topic_prefix + "/"
            if retain:
                problem = "retained message"  # not a live command (Retain Handling 2 keeps these away over MQTT 5)
            elif "+" in topic or "#" in topic:
                problem = "invalid device id"
            elif self.commands is not None:  # tenants: from the device's own tenant's space only
                found = self.commands.target(topic)
                if isinstance(found, str):
                    problem = found
                else:
                    device_id, device_topic = found
            elif not topic.startswith(prefix):
                problem = "topic outside the prefix"
            else:
                device_id, sep, rest = topic[len(prefix):].partition("/")
                device_topic = f"devices/{device_id}/{rest}"
                if not device_id or not sep or not rest:
                    problem = "no device id level and rest"
                elif device_id.startswith("$") or "\x00" in device_id:
                    problem = "invalid device id"
            if problem is None and self.downlink is None:
                problem = "no downlink wired"
            if problem is not None:
                self.commands_undeliverable += 1
                self._log.warning("uplink.command_refused", topic=topic[:200], reason=problem)
                return
            properties, expiry = self._command_properties(props)
            assert self.downlink is not None
            delivered = self.downlink(device_id, device_topic, payload, min(qos, 1), properties,
                                      message_expiry=expiry)
        except Exception:  # noqa: BLE001 - a malformed message or a bug: count it, keep the connection
            self.commands_undeliverable += 1
            self._log.exception("uplink.command_failed")
            return
        if delivered:
            self.commands_delivered += 1
            self._log.debug("uplink.command_delivered", device_id=device_id, topic=device_topic)
        else:
            self.commands_undeliverable += 1
            self._log.info("uplink.command_undeliverable", device_id=device_id, topic=device_topic,
                           reason="no session with a matching subscription")

    @property
    def command_filters(self) -> tuple[str, ...]:
        """The filters the uplink subscribes to for commands (after every connect); () when the downlink is off or
        held (:attr:`commands_held`)."""
        if self.commands_held:
            return ()
        if self.commands is not None:
            return tuple(self.commands.filters())
        return (self._settings.command_filter,) if self._settings.command_filter else ()

    def _command_properties(self, props: Properties) -> tuple[Properties, int | None]:
        """The MQTT 5 properties a command carries down (a Response Topic ``{prefix}/{id}/rest`` is mapped back
        to ``devices/{id}/rest``, like the topic), and its Message Expiry Interval."""
        if not props:
            return NO_PROPERTIES, None
        values: dict[PropertyId, int | str | bytes] = {}
        for pid in (PropertyId.PAYLOAD_FORMAT_INDICATOR, PropertyId.CONTENT_TYPE, PropertyId.CORRELATION_DATA):
            value = props.get(pid)
            if value is not None:
                values[pid] = value
        rt = props.get(PropertyId.RESPONSE_TOPIC)
        if isinstance(rt, str) and self.commands is not None:  # tenant-aware: only into the device's own space
            values[PropertyId.RESPONSE_TOPIC] = self.commands.device_response_topic(rt)
        elif isinstance(rt, str):
            prefix = self._settings.topic_prefix + "/"
            values[PropertyId.RESPONSE_TOPIC] = "devices/" + rt[len(prefix):] if rt.startswith(prefix) else rt
        expiry = props.get(PropertyId.MESSAGE_EXPIRY_INTERVAL)
        out = Properties(values=values, user=props.user) if values or props.user else NO_PROPERTIES
        return out, expiry if isinstance(expiry, int) else None
