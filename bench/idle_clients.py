"""Hold many idle MQTT connections over mutual TLS in one asyncio process (scenario D).

    python bench/idle_clients.py HOST PORT CA DEVICES_DIR ID [ID ...]   (or --ids-file FILE)

Each connection presents its own device certificate (DEVICES_DIR/ID.crt, .key), sends an MQTT 3.1.1 CONNECT with
client id = ID and keep-alive 300 s, and checks the CONNACK (return code 0). Then it stays idle. When every
connection is up (or failed) one JSON line goes to stdout: {"connected": n, "failed": m, "seconds": s, "errors":
[...]}; the process then waits until its stdin closes or it gets SIGTERM, and closes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time
from asyncio import sslproto
from pathlib import Path

KEEPALIVE = 300


def connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + KEEPALIVE.to_bytes(2, "big")  # level 4 (3.1.1), clean session
    body = variable + len(cid).to_bytes(2, "big") + cid
    assert len(body) < 128
    return b"\x10" + bytes([len(body)]) + body


async def hold(host: str, port: int, ca: str, folder: Path, device_id: str, sem: asyncio.Semaphore,
               writers: list[asyncio.StreamWriter], timeout: float) -> str | None:
    async with sem:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=ca)
        ctx.load_cert_chain(str(folder / f"{device_id}.crt"), str(folder / f"{device_id}.key"))
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), timeout)
            writer.write(connect_packet(device_id))
            connack = await asyncio.wait_for(reader.readexactly(4), timeout)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            return f"{device_id}: {type(exc).__name__}: {exc}"
        if connack[0] != 0x20 or connack[3] != 0:
            writer.close()
            return f"{device_id}: CONNACK {connack.hex()}"
        writers.append(writer)
        return None


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("ca")
    parser.add_argument("devices_dir", type=Path)
    parser.add_argument("ids", nargs="*")
    parser.add_argument("--ids-file", type=Path)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    ids = list(args.ids)
    if args.ids_file:
        ids += args.ids_file.read_text().split()
    # Our own side of 1,000 TLS connections: asyncio's 256 KiB read buffer each would be 256 MB here.
    sslproto.SSLProtocol.max_size = 16 * 1024  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_stdin() -> None:
        if not sys.stdin.buffer.read1(65536):  # EOF: the benchmark is done with us
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    sem = asyncio.Semaphore(args.concurrency)
    writers: list[asyncio.StreamWriter] = []
    t0 = time.monotonic()
    results = await asyncio.gather(*(hold(args.host, args.port, args.ca, args.devices_dir, i, sem, writers,
                                          args.timeout) for i in ids))
    errors = [r for r in results if r is not None]
    print(json.dumps({"connected": len(writers), "failed": len(errors), "seconds": round(time.monotonic() - t0, 3),
                      "errors": errors[:5]}), flush=True)
    await stop.wait()
    for w in writers:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
