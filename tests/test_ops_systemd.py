"""systemd packaging: the unit has what an operator needs, and scripts/install.sh lays out a working install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgegw.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / "edgegw.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_unit_has_watchdog_restart_reload_directories_and_hardening() -> None:
    s = unit_settings()
    expected = {
        "Type": "notify", "Restart": "on-failure", "ExecReload": "/bin/kill -HUP $MAINPID",
        "StateDirectory": "edgegw", "ConfigurationDirectory": "edgegw", "LogsDirectory": "edgegw",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "", "SystemCallFilter": "@system-service", "User": "edgegw",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], (key, s.get(key))
    assert int(s["WatchdogSec"][0]) > 0
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert s["MemoryMax"][0].endswith(("M", "G"))
    assert s["ExecStart"][0].startswith("/opt/edgegw/bin/edgegw run --config /etc/edgegw/")


def test_sysusers_and_tmpfiles_declare_the_service_user_and_folders() -> None:
    sysusers = [line.split() for line in (ROOT / "systemd" / "edgegw.sysusers").read_text().splitlines()
                if line and not line.startswith("#")]
    assert sysusers[0][:2] == ["u", "edgegw"]
    tmpfiles = {line.split()[1]: line.split() for line in (ROOT / "systemd" / "edgegw.tmpfiles").read_text()
                .splitlines() if line and not line.startswith("#")}
    assert tmpfiles["/etc/edgegw"] == ["d", "/etc/edgegw", "0750", "root", "edgegw", "-"]
    assert tmpfiles["/var/lib/edgegw"][3:5] == ["edgegw", "edgegw"]


@pytest.mark.slow
def test_install_script_stages_a_venv_unit_and_config(tmp_path: Path) -> None:
    stage = tmp_path / "root"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--root", str(stage),
                           "--upstream", "cloud.example.net:8883", "--mqtt-port", "18883"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    edgegw = stage / "opt" / "edgegw" / "bin" / "edgegw"
    config_path = stage / "etc" / "edgegw" / "edgegw.toml"
    assert edgegw.is_file()
    check = subprocess.run([str(edgegw), "check-config", str(config_path)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stderr
    config = load_config(config_path)
    state = stage / "var" / "lib" / "edgegw"
    assert config.outbox.path == state / "outbox.db"  # writable under ProtectSystem=strict
    assert config.mqtt.session_store == state / "mqtt-sessions.msgpack"
    assert config.admin.bind == "127.0.0.1"
    assert (stage / "etc" / "systemd" / "system" / "edgegw.service").read_text() == \
        (ROOT / "systemd" / "edgegw.service").read_text()
    assert (stage / "usr" / "lib" / "sysusers.d" / "edgegw.conf").is_file()
    assert (stage / "usr" / "lib" / "tmpfiles.d" / "edgegw.conf").is_file()
    assert (stage / "opt" / "edgegw" / "docs" / "OPERATIONS.md").is_file()
    assert (config.tls.key.stat().st_mode & 0o777) == 0o640  # readable by the service's group
    assert ((stage / "etc" / "edgegw" / "pki" / "ca.key").stat().st_mode & 0o777) == 0o600
    # The status page ships inside the installed package.
    page = subprocess.run([str(stage / "opt" / "edgegw" / "bin" / "python"), "-c",
                           "from importlib import resources; "
                           "print(len(resources.files('edgegw.admin').joinpath('status.html').read_bytes()))"],
                          capture_output=True, text=True, timeout=60)
    assert page.returncode == 0 and int(page.stdout) > 1000, page.stderr
    # Running it again keeps the config, skips pip (this checkout is what is installed) and still fixes up the
    # unit and the permissions.
    before = config_path.read_text()
    unit = stage / "etc" / "systemd" / "system" / "edgegw.service"
    unit.write_text("stale")
    config.tls.key.chmod(0o644)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--root", str(stage)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "keeping the existing" in proc.stdout
    assert "already installed" in proc.stdout and "pip skipped" in proc.stdout, proc.stdout
    assert re.fullmatch(r"[0-9a-f]{64}\n", (stage / "opt" / "edgegw" / ".installed-source").read_text())
    assert config_path.read_text() == before
    assert unit.read_text() == (ROOT / "systemd" / "edgegw.service").read_text()
    assert (config.tls.key.stat().st_mode & 0o777) == 0o640
    assert subprocess.run([str(edgegw), "check-config", str(config_path)], check=False, capture_output=True,
                          timeout=60).returncode == 0
