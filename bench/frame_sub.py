"""The benchmark's upstream subscriber when the gateway packs records into batch frames (``uplink.batch_max_records``
> 1): what a cloud consumer of edgegw frames does, in the output format of ``mosquitto_sub -F '%U %p'``.

Subscribes to ``#`` at QoS 1 with paho and writes one line ``<receive time: unix seconds.nanoseconds> <payload>`` per record: a frame
(topic ending in ``/_batch`` or ``/_batch/zlib``) is decoded with :func:`edgegw.uplink.frames.decode_frame` and
each of its records gets the frame's receive time; any other message is one line, as mosquitto_sub would print
it. The harness's ``Subscriber`` reads the file as it grows. Payloads are the generator's single-line JSON.

    python bench/frame_sub.py --port P --cafile CA --cert C --key K --client-id ID --out FILE
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time

import paho.mqtt.client as mqtt

from edgegw.uplink.frames import decode_frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    out = open(args.out, "ab", buffering=0)  # noqa: SIM115 - the process's whole life; unbuffered like mosquitto_sub

    def on_connect(client: mqtt.Client, _userdata: object, _flags: object, reason: object, _props: object) -> None:
        client.subscribe("#", qos=1)

    def on_message(_client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        ns = time.time_ns()
        stamp = b"%d.%09d " % divmod(ns, 1_000_000_000)  # mosquitto_sub's %U: unix seconds with nanoseconds
        topic = msg.topic
        if topic.endswith("/_batch") or topic.endswith("/_batch/zlib"):
            records = decode_frame(msg.payload, compressed=topic.endswith("/zlib"))
            out.write(b"".join(stamp + r["payload"] + b"\n" for r in records))
        else:
            out.write(stamp + msg.payload + b"\n")

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv311)
    context = ssl.create_default_context(cafile=args.cafile)
    context.load_cert_chain(args.cert, args.key)
    client.tls_set_context(context)
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=60)
    try:
        client.loop_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
