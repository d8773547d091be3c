"""The device registry: `edgegw devices ...` as a real CLI process (JSON, exit codes), and what issuing writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgegw.registry.store import DeviceState, Registry, RegistryError, blocked_devices


def edgegw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    assert edgegw("pki", "init", str(d)).returncode == 0
    assert edgegw("pki", "issue", str(d), "device", "dev-1", "dev-2").returncode == 0
    return d


def test_issuing_registers_devices_and_records_certificates(pki_dir: Path) -> None:
    with Registry.open(pki_dir / "registry.db") as reg:
        assert [d.id for d in reg.devices()] == ["dev-1", "dev-2"]
        assert all(d.state is DeviceState.ACTIVE for d in reg.devices())
        kinds = sorted(c.kind for c in reg.certificates())
    assert kinds == ["ca", "device", "device"]


def test_list_show_suspend_resume_with_json_and_exit_codes(pki_dir: Path) -> None:
    listed = edgegw("devices", "list", str(pki_dir), "--json")
    assert listed.returncode == 0
    assert [d["id"] for d in json.loads(listed.stdout)] == ["dev-1", "dev-2"]

    out = edgegw("devices", "suspend", str(pki_dir), "dev-1", "--reason", "stolen", "--json")
    assert out.returncode == 0
    body = json.loads(out.stdout)
    assert body["state"] == "suspended" and body["previous_state"] == "active" and body["reason"] == "stolen"
    assert edgegw("devices", "suspend", str(pki_dir), "dev-1").returncode == 0  # idempotent
    assert blocked_devices(pki_dir / "registry.db") == {"dev-1": (DeviceState.SUSPENDED, "stolen")}

    suspended = json.loads(edgegw("devices", "list", str(pki_dir / "registry.db"), "--state", "suspended",
                                  "--json").stdout)
    assert [d["id"] for d in suspended] == ["dev-1"]
    text = edgegw("devices", "list", str(pki_dir)).stdout
    assert "dev-1" in text and "suspended" in text

    shown = json.loads(edgegw("devices", "show", str(pki_dir), "dev-1", "--json").stdout)
    assert shown["id"] == "dev-1" and len(shown["certificates"]) == 1
    assert shown["certificates"][0]["revoked_at"] is None

    out = edgegw("devices", "resume", str(pki_dir), "dev-1")
    assert out.returncode == 0 and out.stdout.strip() == "dev-1: suspended -> active"
    assert blocked_devices(pki_dir / "registry.db") == {}

    unknown = edgegw("devices", "show", str(pki_dir), "nope")
    assert unknown.returncode == 3 and "no device 'nope'" in unknown.stderr
    assert edgegw("devices", "suspend", str(pki_dir), "nope").returncode == 3

    assert edgegw("pki", "revoke", str(pki_dir), "dev-2").returncode == 0
    revoked = edgegw("devices", "resume", str(pki_dir), "dev-2")
    assert revoked.returncode == 4 and "revoked" in revoked.stderr
    # A new certificate brings a revoked device back.
    assert edgegw("pki", "issue", str(pki_dir), "device", "dev-2", "--force").returncode == 0
    assert json.loads(edgegw("devices", "show", str(pki_dir), "dev-2", "--json").stdout)["state"] == "active"


def test_missing_registry_is_exit_2(tmp_path: Path) -> None:
    out = edgegw("devices", "list", str(tmp_path / "nothing.db"))
    assert out.returncode == 2 and "no device registry" in out.stderr
    assert not (tmp_path / "nothing.db").exists()


def test_register_keeps_state_and_updates_fields(tmp_path: Path) -> None:
    with Registry.open(tmp_path / "r.db") as reg:
        reg.register("a", group="g1", tenant="t1", metadata={"x": 1})
        reg.set_state("a", DeviceState.SUSPENDED, "why")
        device = reg.register("a", group="g2")
        assert (device.state, device.group, device.tenant, device.metadata) == (DeviceState.SUSPENDED, "g2", "t1",
                                                                                 {"x": 1})
        assert [d.id for d in reg.devices(group="g2", tenant="t1")] == ["a"]
        with pytest.raises(RegistryError, match="unknown device 'b'"):
            reg.set_state("b", DeviceState.ACTIVE)


def test_transaction_groups_writes_into_one_commit_and_rolls_back_as_one(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with Registry.open(path) as reg:
        with pytest.raises(RuntimeError), reg.transaction():
            reg.register("a")
            reg.register("b", group="g")
            assert [d.id for d in reg.devices()] == ["a", "b"]  # visible inside, before the commit
            raise RuntimeError("crash in the middle of a batch")
        assert reg.devices() == []
        reg.register("c")
        with reg.transaction():
            reg.set_state("c", DeviceState.SUSPENDED, "x")
            # The gateway's read-only snapshot (another connection) still reads the committed state meanwhile.
            assert blocked_devices(path) == {}
        assert blocked_devices(path) == {"c": (DeviceState.SUSPENDED, "x")}
