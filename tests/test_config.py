"""Config loading: the example documents every key with its default; bad values name the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgegw.config import _SECTIONS, load_config
from edgegw.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "edgegw.example.toml"


def test_example_documents_every_key_with_its_default() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    config = load_config(EXAMPLE)
    for section, cls in _SECTIONS.items():
        assert section in raw, f"section [{section}] missing from the example"
        for f in dataclasses.fields(cls):
            assert f.name in raw[section], f"{section}.{f.name} missing from the example"
            if f.default is not dataclasses.MISSING:
                value = getattr(getattr(config, section), f.name)
                default = f.default
                if isinstance(default, Path):
                    assert value == EXAMPLE.parent / default, f"{section}.{f.name}"
                else:
                    assert value == default, f"{section}.{f.name}: example says {value!r}, default is {default!r}"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    target = tmp_path / "sub" / "gw.toml"
    target.write_text(EXAMPLE.read_text())
    config = load_config(target)
    assert config.tls.cert == tmp_path / "sub" / "pki" / "server" / "gateway.crt"
    assert config.outbox.path == tmp_path / "sub" / "state" / "outbox.db"


@pytest.mark.parametrize(("edit", "key"), [
    (("port = 8883", "port = 70000", 1), "mqtt.port"),
    (("max_packet_size = 262144", 'max_packet_size = "big"', 1), "mqtt.max_packet_size"),
    (("synchronous = \"full\"", "synchronous = \"sometimes\"", 1), "outbox.synchronous"),
    (("quarantine_max_records = 100000", "quarantine_max_records = 0", 1), "outbox.quarantine_max_records"),
    (("quarantine_max_bytes = 67108864", "quarantine_max_bytes = 1024", 1), "outbox.quarantine_max_bytes"),
    (("quarantine_max_bytes = 67108864", 'quarantine_max_bytes = "64M"', 1), "outbox.quarantine_max_bytes"),
    (("[log]", "[log]\nverbose = true", 1), "log.verbose"),
    (("host = \"cloud.example.com\"", "", 1), "uplink.host"),
    (("[gateway]", "[gatewy]", 1), "gatewy"),
    (('publish = ["devices/{device_id}/#"]', 'publish = "devices/#"', 1), "acl.publish"),
])
def test_bad_values_name_the_key(tmp_path: Path, edit: tuple[str, str, int], key: str) -> None:
    old, new, count = edit
    text = EXAMPLE.read_text()
    assert old in text
    target = tmp_path / "bad.toml"
    target.write_text(text.replace(old, new, count))
    with pytest.raises(ConfigError) as info:
        load_config(target)
    assert info.value.key == key
    assert key in str(info.value)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("port = 8883", "port = -1", 1))
    proc = subprocess.run([sys.executable, "-m", "edgegw", "check-config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "mqtt.port" in proc.stderr
    # The example parses but points at certificate files that do not exist: still exit 2, naming the key.
    proc = subprocess.run([sys.executable, "-m", "edgegw", "check-config", str(EXAMPLE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "tls.cert" in proc.stderr


def test_init_writes_a_config_that_checks(tmp_path: Path) -> None:
    folder = tmp_path / "gw"
    proc = subprocess.run([sys.executable, "-m", "edgegw", "init", str(folder), "--upstream", "127.0.0.1:18883",
                           "--mqtt-port", "18884"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    config = load_config(folder / "edgegw.toml")
    assert config.mqtt.port == 18884
    assert (config.uplink.host, config.uplink.port) == ("127.0.0.1", 18883)
    assert config.uplink.ca == folder / "pki" / "ca.crt"
    for path in (config.tls.cert, config.tls.key, config.uplink.cert, config.uplink.key):
        assert path.is_file()
    assert (config.tls.key.stat().st_mode & 0o777) == 0o600
    proc = subprocess.run([sys.executable, "-m", "edgegw", "check-config", str(folder / "edgegw.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # A second init without --force refuses instead of overwriting the PKI.
    proc = subprocess.run([sys.executable, "-m", "edgegw", "init", str(folder), "--upstream", "h:1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
