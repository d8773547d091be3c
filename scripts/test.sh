#!/usr/bin/env bash
# Sets up what the test suite needs on a fresh Debian/Ubuntu machine (run as root) and runs it.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k uplink -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v openssl >/dev/null || need+=(openssl)
# libcoap's client is the independent CoAP peer in tests/test_coap*.py (coaps+tcp and DTLS with certificates).
command -v coap-client-openssl >/dev/null || need+=(libcoap3-bin)
# Headless Chromium renders the admin status page in tests/test_status_page.py.
command -v chromium >/dev/null || need+=(chromium)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing OS packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
