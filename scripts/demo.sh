#!/usr/bin/env bash
# Sets up edgegw in ./.venv on a fresh Debian/Ubuntu machine and runs `edgegw demo` (no services needed).
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --devices 200 --json`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import ensurepip' 2>/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/edgegw demo "$@"
