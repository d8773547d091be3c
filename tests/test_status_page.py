"""The status page in headless Chromium (Debian package `chromium`): its script ran and shows live values."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from typing import Any

import pytest

from conftest import Fleet, Mosquitto, wait_until
from ops_peers import PahoDevice, admin_gateway, bad_handshakes, get_json

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(url: str, budget_ms: int = 4000, timeout: float = 60.0) -> str:
    """The DOM after the page's scripts ran (fetches included, within ``budget_ms`` of virtual time)."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="edgegw-chromium-") as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def text_of(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', dom)
    assert m, f"#{element_id} not in the DOM:\n{dom[:3000]}"
    return m.group(1)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/test.sh installs it)")
def test_status_page_shows_live_values_in_chromium(mosquitto: Mosquitto, gateway_factory: Any,
                                                    fleet: Fleet) -> None:
    gw, port = admin_gateway(gateway_factory, mosquitto)
    devices = [PahoDevice(fleet, gw.port, "dev-04"), PahoDevice(fleet, gw.port, "dev-05", v5=True)]
    try:
        devices[0].publish(25)
        devices[1].publish(15)
        bad_handshakes(gw.port, 1)
        wait_until(lambda: len(get_json(port, "/api/stats")[1]["history"]) >= 2, 10, what="two history samples")
        dom = dump_dom(f"http://127.0.0.1:{port}/")
    finally:
        for d in devices:
            d.close()
    # Values only the script can have put there (the HTML ships dashes and "never").
    assert int(re.search(r'data-polls="(\d+)"', dom).group(1)) >= 1, dom[:2000]  # type: ignore[union-attr]
    assert text_of(dom, "gateway-id") == "gw-test"
    assert text_of(dom, "devices-count") == "2"
    assert text_of(dom, "received-total") == "40"
    assert text_of(dom, "uplink-state") == "connected"
    assert text_of(dom, "ready") == "ready"
    assert re.fullmatch(r"\d+", text_of(dom, "outbox-depth"))
    assert re.fullmatch(r"\d+\.\d", text_of(dom, "rate-received"))
    assert 'data-device="dev-04"' in dom and 'data-device="dev-05"' in dom
    assert "mqtt 5" in dom and "mqtt 3.1.1" in dom
    assert 'data-event="tls.handshake_failed"' in dom
    points = re.search(r'id="depth-line"[^>]*points="([^"]*)"', dom)
    assert points and len(points.group(1).split()) >= 2, dom[:3000]
    assert text_of(dom, "error") == ""
    assert gw.terminate() == 0
