#!/usr/bin/env bash
# Installs edgegw on a Debian-based gateway (run as root from a checkout):
#   a venv under /opt/edgegw, the systemd unit, sysusers/tmpfiles entries, and (with --upstream) a ready config under
#   /etc/edgegw written by `edgegw init --state-dir /var/lib/edgegw`. Safe to run again: it upgrades the venv (and
#   skips pip when this very checkout is already installed there), redoes the unit, users and permissions, and
#   never overwrites an existing config or PKI.
#
#   sudo bash scripts/install.sh --upstream cloud.example.com:8883 [--upstream-ca FILE] [--mqtt-port 8883] [--start]
#
# --root DIR installs into DIR instead of / (staging, packaging, tests): nothing is started or enabled then.
# --reinstall runs pip even when this checkout is already installed (e.g. to upgrade the dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)

root=""
upstream=""
upstream_ca=""
mqtt_port=8883
start=no
reinstall=no
python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2%/}; shift 2 ;;
    --upstream) upstream=$2; shift 2 ;;
    --upstream-ca) upstream_ca=$2; shift 2 ;;
    --mqtt-port) mqtt_port=$2; shift 2 ;;
    --start) start=yes; shift ;;
    --reinstall) reinstall=yes; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

prefix=$root/opt/edgegw
etc=$root/etc/edgegw
state=$root/var/lib/edgegw
unitdir=$root/etc/systemd/system
live=no
[ -z "$root" ] && live=yes

if [ "$live" = yes ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or use --root DIR to stage)" >&2
  exit 2
fi
if [ "$live" = yes ] && ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi

echo "== venv in $prefix"
[ -x "$prefix/bin/python" ] || "$python" -m venv "$prefix"
# What pip would build: the package's files and its metadata. The same fingerprint as the last successful install
# (and an edgegw that still imports there) means a re-run has nothing to build: pip would take ~10 s to rebuild
# and reinstall the same files. A version number alone would miss a changed checkout that kept its version.
source_id=$(cd "$src" && find pyproject.toml README.md edgegw -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
  -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
stamp=$prefix/.installed-source
if [ "$reinstall" = no ] && [ "$(cat "$stamp" 2>/dev/null)" = "$source_id" ] \
    && "$prefix/bin/python" -I -c 'import edgegw' 2>/dev/null; then
  echo "== this checkout is already installed in $prefix: pip skipped (--reinstall to force)"
else
  rm -f "$stamp"
  "$prefix/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$src"
  echo "$source_id" > "$stamp"
fi
install -d -m 0755 "$prefix/docs"
install -m 0644 "$src"/docs/*.md "$prefix/docs/"

echo "== systemd unit, sysusers, tmpfiles"
install -d -m 0755 "$unitdir" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
install -m 0644 "$src/systemd/edgegw.service" "$unitdir/edgegw.service"
install -m 0644 "$src/systemd/edgegw.sysusers" "$root/usr/lib/sysusers.d/edgegw.conf"
install -m 0644 "$src/systemd/edgegw.tmpfiles" "$root/usr/lib/tmpfiles.d/edgegw.conf"
group=root
if [ "$live" = yes ]; then
  systemd-sysusers edgegw.conf
  systemd-tmpfiles --create edgegw.conf
  group=edgegw
else
  install -d -m 0750 "$etc" "$state"
fi

if [ -e "$etc/edgegw.toml" ]; then
  echo "== keeping the existing $etc/edgegw.toml"
elif [ -n "$upstream" ]; then
  echo "== config and PKI in $etc (state in /var/lib/edgegw)"
  args=(init "$etc" --upstream "$upstream" --mqtt-port "$mqtt_port" --state-dir "$state")
  [ -n "$upstream_ca" ] && args+=(--upstream-ca "$upstream_ca")
  "$prefix/bin/edgegw" "${args[@]}"
else
  echo "== no config yet: run  $prefix/bin/edgegw init $etc --upstream HOST:PORT --state-dir /var/lib/edgegw"
fi

if [ -d "$etc/pki" ]; then
  # The service reads its own keys (group edgegw); the fleet CA key, which only `edgegw pki issue` needs, stays root's.
  chown -R "root:$group" "$etc"
  find "$etc" -type d -exec chmod 0750 {} +
  find "$etc" -type f -exec chmod 0640 {} +
  for key in "$etc/pki/ca.key" "$etc/pki/root-ca.key"; do
    if [ -f "$key" ]; then chmod 0600 "$key"; fi
  done
fi
if [ "$live" = yes ]; then
  chown -R edgegw:edgegw /var/lib/edgegw
fi

if [ "$live" = yes ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable edgegw.service
  if [ "$start" = yes ]; then
    systemctl restart edgegw.service
    systemctl --no-pager --lines=5 status edgegw.service || true
  fi
fi
echo "== done: $prefix/bin/edgegw; unit edgegw.service; status page http://127.0.0.1:9180/ once running"
