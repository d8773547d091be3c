"""Every ```toml block of docs/POLICY.md loads as a real config, so the documented examples cannot rot.

Each block is completed with the minimal [tls] / [uplink] sections (and, for the blocks that name them, the schema
files and the plug-in module they refer to), then loaded in process (``config_from_mapping``, which compiles every
chain, expression, schema and plug-in like the daemon does) and the three worked examples also through the real
``edgegw check-config`` command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgegw.config import config_from_mapping
from edgegw.pipeline.reload import build_pipeline

DOC = Path(__file__).resolve().parent.parent / "docs" / "POLICY.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.DOTALL)
MINIMAL = """
[tls]
cert = "pki/gateway.crt"
key = "pki/gateway.key"
ca = "pki/ca.crt"

[uplink]
host = "cloud.example.com"
ca = "pki/ca.crt"
cert = "pki/uplink.crt"
key = "pki/uplink.key"
"""
PLUGIN = '''
def tag_currency(data, ctx):
    data["currency"] = data.get("currency", "EUR")
    return data
'''


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What the examples refer to: the TLS files (check-config wants them), the schemas, the plug-in module."""
    (tmp_path / "pki").mkdir()
    for name in ("gateway.crt", "gateway.key", "ca.crt", "uplink.crt", "uplink.key"):
        (tmp_path / "pki" / name).write_text("placeholder\n")
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "order.json").write_text(json.dumps(
        {"type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}}))
    (tmp_path / "schemas" / "telemetry.json").write_text(json.dumps({"type": "object"}))
    (tmp_path / "store_plugins.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_doc_has_the_blocks_we_check() -> None:
    assert len(BLOCKS) >= 11  # 6 pipeline (incl. the three use cases), 5 limits
    text = DOC.read_text()
    for example in ("**IoT telemetry**", "**SaaS, multi-tenant**", "**E-commerce**"):
        assert example in text


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_toml_block_loads_as_a_config(index: int, folder: Path) -> None:
    block = BLOCKS[index]
    raw = tomllib.loads(MINIMAL + block)
    config = config_from_mapping(raw, base_dir=folder)  # raises ConfigError naming the key if the doc is wrong
    if config.pipeline.enabled:
        assert build_pipeline(config) is not None  # every chain, schema and plug-in compiled
    for section in ("limits", "routes", "transforms", "tenants", "versions", "routing"):
        if section in tomllib.loads(block):
            assert section in raw


def _example(title: str) -> str:
    """The pipeline block of a worked example, plus the rate-limit block of the same use case."""
    text = DOC.read_text()
    examples = text[text.index("## Examples"):text.index("## Cost")]
    limits = text[text.index("### Examples", text.index("## Rate limits")):]
    def first_block(part: str, marker: str) -> str:
        return re.findall(r"```toml\n(.*?)```", part[part.index(marker):], re.DOTALL)[0]
    markers = {"iot": ("**IoT telemetry**", "IoT telemetry,"), "saas": ("**SaaS, multi-tenant**", "SaaS multi-tenant,"),
               "shop": ("**E-commerce**", "E-commerce (")}[title]
    return first_block(examples, markers[0]) + "\n" + first_block(limits, markers[1])


@pytest.mark.parametrize("title", ["iot", "saas", "shop"])
def test_worked_examples_pass_edgegw_check_config(title: str, folder: Path) -> None:
    path = folder / f"{title}.toml"
    path.write_text(MINIMAL + _example(title))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "edgegw", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{path}: ok"
    # And a broken one is refused naming the key, so this test can fail.
    path.write_text(MINIMAL + _example(title).replace("[[limits.rate]]\n", "[[limits.rate]]\nspeed = 1\n", 1))
    proc = subprocess.run([sys.executable, "-m", "edgegw", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 2 and "limits.rate[0].speed" in proc.stderr, proc.stderr
