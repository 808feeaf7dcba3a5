#!/usr/bin/env bash
# Installs the Debian packages eoq needs to build, test and benchmark, when any
# is missing. Needs root (or sudo) only when something must be installed.
set -euo pipefail
packages=(build-essential cmake pkg-config libpq-dev libfmt-dev catch2 libbenchmark-dev postgresql postgresql-client spin
          libcli11-dev libcpp-httplib-dev libmicrohttpd-dev nlohmann-json3-dev chromium chromium-driver pgbouncer tzdata
          patroni etcd-server)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "installing: ${missing[*]}"
sudo=""
[[ $(id -u) -eq 0 ]] || sudo=sudo
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends "${missing[@]}"
