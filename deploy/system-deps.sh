#!/usr/bin/env bash
# Checks (and, as root on Debian/Ubuntu, installs) what the local stack and the tests need outside Python.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v mvn >/dev/null || missing+=(maven)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
# promtool (Debian's prometheus package): `make test` checks deploy/prometheus.yml, the dashboard's PromQL
# and a running worker's /metrics with it. Only promtool is used; on a host with systemd the package also
# enables Debian's Prometheus service (port 9090): `systemctl disable --now prometheus` if that is unwanted.
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "missing system packages; install them with:" >&2
  echo "  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
