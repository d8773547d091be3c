"""Shared test peers: a throwaway PKI, a real mosquitto broker with mutual TLS, and a paho subscriber ("sink").

Everything is local and real (STYLE §5): mosquitto runs as a child process on a free 127.0.0.1 port, every wait has
a timeout, and every process is killed in teardown.

Fixtures:
  pki                -> LabPKI (session): CA, server cert for 127.0.0.1/localhost, client certs "uplink" and "sink",
                        and ``rogue_uplink``: a client cert "uplink" from a different CA.
  mosquitto_factory  -> callable(**options) -> Mosquitto, not started; every broker made is stopped at teardown.
  mosquitto          -> a started Mosquitto with default options.
  sink_factory       -> callable(broker, **options) -> Sink, connected and subscribed; closed at teardown.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# Vendored third-party suites (tests/interop/) are run as programs by tests/test_mqtt_interop.py, never collected.
collect_ignore = ["interop"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# --- throwaway PKI -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass
class _CA:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_ca(folder: Path, name: str) -> _CA:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, folder / f"{name}.key")
    return _CA(name, key, cert, path)


def issue(ca: _CA, folder: Path, common_name: str, *, server: bool = False, dns: tuple[str, ...] = (),
          ips: tuple[str, ...] = (), file_stem: str | None = None) -> CertPair:
    """A leaf certificate signed by ``ca``: a TLS client cert, or a server cert with the given SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    stem = file_stem or common_name
    pair = CertPair(folder / f"{stem}.crt", folder / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


@dataclass
class LabPKI:
    """PEM files in ``folder``. ``ca`` signs ``server`` and ``clients``; ``rogue_uplink`` (CN "uplink") is signed
    by ``other_ca``, which the broker does not trust."""

    folder: Path
    ca: Path
    server: CertPair
    clients: dict[str, CertPair]
    other_ca: Path
    rogue_uplink: CertPair
    _ca: _CA = field(repr=False)

    def client(self, name: str) -> CertPair:
        """The client cert with CN ``name`` (issued on first use)."""
        if name not in self.clients:
            self.clients[name] = issue(self._ca, self.folder, name)
        return self.clients[name]

    def ssl_context(self, name: str) -> ssl.SSLContext:
        """A client context presenting ``name``'s certificate and trusting our CA."""
        pair = self.client(name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(self.ca))
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
        return ctx


def make_lab_pki(folder: Path) -> LabPKI:
    ca = make_ca(folder, "lab-ca")
    other = make_ca(folder, "other-ca")
    server = issue(ca, folder, "broker", server=True, dns=("localhost",), ips=("127.0.0.1",))
    clients = {name: issue(ca, folder, name) for name in ("uplink", "sink")}
    rogue = issue(other, folder, "uplink", file_stem="rogue-uplink")
    return LabPKI(folder, ca.path, server, clients, other.path, rogue, ca)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


# --- mosquitto ----------------------------------------------------------------------------------------------


_NEXT_PORTS = itertools.count(random.randrange(10_000, 20_000))
"""Ports handed out by :func:`free_port`: each test process walks up from its own random start, once."""


def free_port() -> int:
    """A port that binds now, below the kernel's ephemeral range (``ip_local_port_range``, 32768-60999 by default).
    A port found by binding to 0 comes from that range, where an outgoing connection (the gateway's own uplink, a
    client of another test) may take it as its local port before the server binds it: EADDRINUSE, rarely, as a
    gateway that failed to start. Walked in order, so one process never hands the same port out twice."""
    for port in _NEXT_PORTS:
        if port >= 32_768:
            break
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (another process): the next
            return port
    with socket.socket() as s:  # the walk ran out (never in one suite): the kernel's choice, as before
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = "") -> None:
    """Poll ``predicate`` (synchronously) until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


class Mosquitto:
    """A mosquitto 2 broker on 127.0.0.1 with mutual TLS (``require_certificate``, ``use_identity_as_username``).

    ``start()``/``stop()`` can be repeated; the port stays the same. With ``persistence=True`` sessions and queued
    messages survive a ``stop()`` (SIGTERM) and ``start()``; ``kill()`` (SIGKILL) loses what was not saved.
    ``acl`` is the text of an acl_file (mosquitto syntax), ``extra`` raw config lines.
    """

    host = "127.0.0.1"

    def __init__(self, folder: Path, pki: LabPKI, *, port: int | None = None, persistence: bool = False,
                 max_inflight_messages: int | None = None, acl: str | None = None, extra: str = "") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = folder / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "per_listener_settings false",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {folder}/",
            "max_queued_messages 1000000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to "mosquitto" and cannot read the 0600 keys
        if max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {max_inflight_messages}")
        if acl is not None:
            (folder / "acl").write_text(acl)
            lines.append(f"acl_file {folder / 'acl'}")
        lines += [
            f"listener {self.port} 127.0.0.1",
            f"cafile {pki.ca}",
            f"certfile {pki.server.cert}",
            f"keyfile {pki.server.key}",
            "require_certificate true",
            "use_identity_as_username true",
            extra,
        ]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 5.0) -> Mosquitto:
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s:\n{self.log()}")
                time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def mosquitto_factory(tmp_path: Path, pki: LabPKI) -> Iterator[Callable[..., Mosquitto]]:
    brokers: list[Mosquitto] = []

    def make(**options: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(brokers)}", pki, **options)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop(timeout=3.0)


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto_factory().start()


# --- a subscriber ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    user_properties: dict[str, str]
    dup: bool


class Sink:
    """A paho MQTT 5 subscriber in its own thread, with the "sink" client certificate.

    ``persistent=True`` keeps its session in the broker (clean_start off, session expiry 1 h), so QoS 1 messages
    published while it is away are queued for it; paho reconnects by itself when the broker comes back.
    """

    def __init__(self, broker: Mosquitto, pki: LabPKI, *, topic: str = "#", persistent: bool = False,
                 client_id: str = "sink", cert: str = "sink") -> None:
        self.topic = topic
        self.persistent = persistent
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.connects = 0
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
        client.tls_set_context(pki.ssl_context(cert))
        client.reconnect_delay_set(min_delay=0.05, max_delay=0.5)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        client.connect(broker.host, broker.port, keepalive=30, clean_start=not persistent, properties=props)
        client.loop_start()
        if not self._subscribed.wait(5.0):
            self.close()
            raise RuntimeError(f"sink did not connect and subscribe within 5 s:\n{broker.log()}")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            return
        self.connects += 1
        if flags.session_present:
            self._subscribed.set()
        else:
            client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or [])
        with self._cond:
            self.messages.append(Received(message.topic, bytes(message.payload), message.qos, user,
                                          bool(message.dup)))
            self._cond.notify_all()

    def snapshot(self) -> list[Received]:
        with self._cond:
            return list(self.messages)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> list[Received]:
        """Block (this thread) until ``predicate(messages)``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sink: condition not met within {timeout} s ({len(self.messages)} "
                                         f"messages received)")
                self._cond.wait(min(left, 0.1))
            return list(self.messages)

    async def until(self, predicate: Callable[[list[Received]], bool], timeout: float) -> list[Received]:
        """Like :meth:`wait_for` without blocking the event loop (poll every 20 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.snapshot()
            if predicate(messages):
                return messages
            if time.monotonic() > deadline:
                raise AssertionError(f"sink: condition not met within {timeout} s ({len(messages)} messages)")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


@pytest.fixture
def sink_factory(pki: LabPKI) -> Iterator[Callable[..., Sink]]:
    sinks: list[Sink] = []

    def make(broker: Mosquitto, **options: Any) -> Sink:
        sink = Sink(broker, pki, **options)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


# --- the gateway as a real process ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """Device-side material made by the real `edgegw pki` CLI: the fleet CA, the gateway's server certificate and
    device certificates ``devices/<id>.crt``; ``rogue_ca`` is another fleet's CA (also made with the CLI)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def device(self, device_id: str) -> CertPair:
        return CertPair(self.folder / "devices" / f"{device_id}.crt", self.folder / "devices" / f"{device_id}.key")

    def rogue_device(self, device_id: str) -> CertPair:
        return CertPair(self.folder.parent / "rogue" / "devices" / f"{device_id}.crt",
                        self.folder.parent / "rogue" / "devices" / f"{device_id}.key")

    def device_context(self, device_id: str, *, rogue: bool = False, with_cert: bool = True) -> ssl.SSLContext:
        pair = self.rogue_device(device_id) if rogue else self.device(device_id)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.ca))
        if with_cert:
            ctx.load_cert_chain(str(pair.cert), str(pair.key))
        return ctx


FLEET_DEVICES = [f"dev-{i:02d}" for i in range(12)] + ["expired-01", "other-01"]


def _edgegw(*args: str) -> subprocess.CompletedProcess[str]:
    import sys
    proc = subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("fleet")
    folder = root / "pki"
    _edgegw("pki", "init", str(folder))
    _edgegw("pki", "issue", str(folder), "server", "gateway", "--san", "localhost", "--san", "127.0.0.1")
    _edgegw("pki", "issue", str(folder), "device", *[d for d in FLEET_DEVICES if d != "expired-01"])
    # An expired device certificate, through the library (the CLI does not issue certificates in the past).
    from edgegw.pki import issue_device
    now = datetime.now(UTC)
    issue_device(folder, "expired-01", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1))
    _edgegw("pki", "init", str(root / "rogue"))
    _edgegw("pki", "issue", str(root / "rogue"), "device", "dev-00")
    return Fleet(folder)


class GatewayProcess:
    """`python -m edgegw run --config FILE` as a child process, its JSON log lines in ``log_path``."""

    def __init__(self, folder: Path, fleet: Fleet, pki: LabPKI, broker: Mosquitto, *, port: int | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = folder / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        sections: dict[str, dict[str, Any]] = {
            "gateway": {"id": "gw-test"},
            "tls": {"cert": str(fleet.folder / "server" / "gateway.crt"),
                    "key": str(fleet.folder / "server" / "gateway.key"), "ca": str(fleet.ca)},
            "mqtt": {"bind": "127.0.0.1", "port": self.port,
                     "session_store": str(folder / "mqtt-sessions.msgpack")},
            "outbox": {"path": str(folder / "outbox.db"), "synchronous": "full"},
            "uplink": {"host": broker.host, "port": broker.port, "ca": str(pki.ca),
                       "cert": str(pki.client("uplink").cert), "key": str(pki.client("uplink").key),
                       "topic_prefix": "cloud", "reconnect_min": 0.1, "reconnect_max": 0.5},
            "log": {"level": "info"},
            # No admin server unless a test asks for one ([admin] in overrides): several test gateways at once
            # must not fight over the default 9180, nor an ephemeral one take a port free_port() handed out.
            "admin": {"enabled": False},
        }
        if overrides and "admin" in overrides:
            sections["admin"] = {}
        for name, values in (overrides or {}).items():
            sections.setdefault(name, {}).update(values)
        self.config_path = folder / "edgegw.toml"
        self.config_path.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"
            for name, values in sections.items()))

    def start(self, timeout: float = 15.0) -> GatewayProcess:
        import sys
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgegw", "run", "--config", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        # Polled often (a few hundred gateway starts per run: the poll's granularity adds up), reading only what this
        # start wrote.
        while not self._logged_since(offset, '"gateway.ready"'):
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready within {timeout} s:\n{self.log()}")
            time.sleep(0.01)
        return self

    def _logged_since(self, offset: int, text: str) -> bool:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return text.encode() in log.read()

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        import json
        out = []
        for line in self.log().splitlines():
            if f'"{name}"' in line:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == name:
                    out.append(entry)
        return out

    def wait_for_event(self, name: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.events(name):
                if all(entry.get(k) == v for k, v in match.items()):
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no log event {name} {match} within {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.02)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture
def gateway_factory(tmp_path: Path, fleet: Fleet, pki: LabPKI) -> Iterator[Callable[..., GatewayProcess]]:
    made: list[GatewayProcess] = []

    def make(broker: Mosquitto, **options: Any) -> GatewayProcess:
        if made:
            # A gateway id of its own (so an uplink client id of its own): gateways of one test sharing an upstream
            # broker would otherwise take each other's upstream session over, round and round.
            overrides = {name: dict(values) for name, values in (options.get("overrides") or {}).items()}
            overrides["gateway"] = {"id": f"gw-test-{len(made)}", **overrides.get("gateway", {})}
            options = {**options, "overrides": overrides}
        gw = GatewayProcess(tmp_path / f"gw{len(made)}", fleet, pki, broker, **options)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.kill()
