"""An AsyncAPI 3 document of the device-facing API, generated from the running config (``edgegw docs``).

The application described is the gateway: a device's PUBLISH is an operation the gateway *receives*, a message the
gateway delivers to a subscribed device is one it *sends*. Channels come from the ACL's topic filters: ``{device_id}``
stays a parameter (the certificate CN), ``+`` becomes ``{levelN}`` and ``#`` becomes ``{rest}`` (any number of
levels). Payloads are opaque bytes: there are no payload validators in the config yet, so there are no schemas
to derive; when validators exist, their schemas belong in ``components.messages``.
"""

from __future__ import annotations

import html
from typing import Any

from edgegw.config import Config

ASYNCAPI_VERSION = "3.0.0"


def _address(pattern: str) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {}
    levels = []
    plus = 0
    for level in pattern.split("/"):
        if level == "{device_id}":
            params["device_id"] = {"description": "The device id: its certificate's CN, also its MQTT client id"}
            levels.append(level)
        elif level == "+":
            plus += 1
            params[f"level{plus}"] = {"description": "Any one topic level"}
            levels.append(f"{{level{plus}}}")
        elif level == "#":
            params["rest"] = {"description": "Any number of topic levels (MQTT '#')"}
            levels.append("{rest}")
        else:
            levels.append(level)
    return "/".join(levels), params


def _channel_id(kind: str, index: int) -> str:
    return f"{kind}{index}"


def asyncapi_document(config: Config, *, host: str | None = None) -> dict[str, Any]:
    mqtt = config.mqtt
    server_host = host or (mqtt.bind if mqtt.bind not in ("0.0.0.0", "::") else "gateway.local")
    servers: dict[str, Any] = {
        "mqtts": {
            "host": f"{server_host}:{mqtt.port}", "protocol": "secure-mqtt", "protocolVersion": "5.0",
            "description": "MQTT 3.1.1 or 5 over TLS >= " + config.tls.min_version + "; a client certificate signed "
                           "by the fleet CA is required. The CONNECT's client id must equal the certificate's CN. "
                           "A message is acknowledged (PUBACK/PUBREC) only once it is stored durably.",
            "security": [{"$ref": "#/components/securitySchemes/deviceCertificate"}],
            "bindings": {"mqtt": {"maximumPacketSize": mqtt.max_packet_size, "bindingVersion": "0.2.0"}},
        },
    }
    if mqtt.lab:
        servers["lab"] = {"host": f"{mqtt.lab_bind}:{mqtt.lab_port}", "protocol": "mqtt", "protocolVersion": "5.0",
                          "description": "LAB ONLY: plain TCP, client id as identity, every topic allowed."}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for kind, patterns, action, verb in (("publish", config.acl.publish, "receive", "Devices publish to"),
                                         ("subscribe", config.acl.subscribe, "send", "Devices subscribe within")):
        for i, pattern in enumerate(patterns):
            address, params = _address(pattern)
            cid = _channel_id(kind, i)
            channel: dict[str, Any] = {
                "address": address,
                "title": f"{verb} {pattern}",
                "description": f"ACL {kind} filter `{pattern}` (acl.{kind}[{i}]).",
                "messages": {"record": {"$ref": "#/components/messages/deviceMessage"}},
            }
            if params:
                channel["parameters"] = params
            channels[cid] = channel
            summary = (f"The gateway stores a device's message on {pattern} and acknowledges it after the commit; "
                       f"it goes upstream as {config.uplink.topic_prefix}/{{device_id}}/... "
                       if kind == "publish" else
                       f"The gateway delivers messages on topics within {pattern} to the subscribed device.")
            operations[f"{action}{kind.title()}{i}"] = {
                "action": action, "channel": {"$ref": f"#/channels/{cid}"}, "summary": summary,
                "bindings": {"mqtt": {"qos": 1, "bindingVersion": "0.2.0"}},
                "messages": [{"$ref": f"#/channels/{cid}/messages/record"}],
            }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"edgegw {config.gateway.id}: device API",
            "version": "1",
            "description": "What devices may publish and subscribe to on this gateway, from its configuration. "
                           f"Limits: {mqtt.max_packet_size} bytes per packet, {mqtt.max_topic_levels} topic levels, "
                           f"{mqtt.max_topic_length} characters per topic, {mqtt.receive_maximum} unacknowledged "
                           "QoS 1/2 publishes per connection.",
        },
        "defaultContentType": "application/octet-stream",
        "servers": servers,
        "channels": channels,
        "operations": operations,
        "components": {
            "securitySchemes": {"deviceCertificate": {
                "type": "X509", "description": "TLS client certificate signed by the fleet CA (`edgegw pki issue "
                                               "PKI device ID`); its single CN is the device id."}},
            "messages": {"deviceMessage": {
                "name": "deviceMessage", "title": "A device message",
                "contentType": "application/octet-stream",
                "summary": "Opaque bytes (no payload validators are configured). MQTT 5 user properties are carried "
                           "upstream.",
                "payload": {"type": "string", "format": "binary"},
            }},
        },
    }


def render_html(doc: dict[str, Any]) -> str:
    """A self-contained HTML page of the document (no external renderer, works offline)."""
    e = html.escape
    rows = []
    for op_id, op in doc["operations"].items():
        cid = op["channel"]["$ref"].rsplit("/", 1)[1]
        ch = doc["channels"][cid]
        params = ", ".join(f"<code>{e(k)}</code>: {e(v['description'])}" for k, v in ch.get("parameters", {}).items())
        direction = "device → gateway" if op["action"] == "receive" else "gateway → device"
        rows.append(f"<tr id=\"{e(op_id)}\"><td>{direction}</td><td><code class=\"address\">{e(ch['address'])}"
                    f"</code></td><td>{e(op['summary'])}</td><td>{params}</td></tr>")
    servers = "".join(f"<li><b>{e(name)}</b> <code>{e(s['protocol'])}://{e(s['host'])}</code>: "
                      f"{e(s.get('description', ''))}</li>" for name, s in doc["servers"].items())
    sec = doc["components"]["securitySchemes"]["deviceCertificate"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(doc['info']['title'])}</title>
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:1.5em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}}</style></head>
<body><h1>{e(doc['info']['title'])}</h1><p>{e(doc['info']['description'])}</p>
<h2>Servers</h2><ul>{servers}</ul>
<h2>Security</h2><p><b>{e(sec['type'])}</b>: {e(sec['description'])}</p>
<h2>Topics</h2><table><thead><tr><th>direction</th><th>topic</th><th>what happens</th><th>parameters</th></tr>
</thead><tbody>{''.join(rows)}</tbody></table>
<h2>Messages</h2><p>{e(doc['components']['messages']['deviceMessage']['summary'])}</p>
<p>AsyncAPI {e(doc['asyncapi'])} document: <a href="/asyncapi.json">asyncapi.json</a></p>
</body></html>
"""
