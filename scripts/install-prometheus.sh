#!/usr/bin/env bash
# Install Debian's `prometheus` package (the server and promtool) for tests/observability.
# Idempotent: does nothing when both are already on PATH. The package's systemd/init service is
# never started: a policy-rc.d that denies service starts is in place for the install only (the
# tests start their own Prometheus on loopback with a temporary storage dir).
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "install-prometheus: need root (or sudo) to apt-get install prometheus" >&2; exit 1
  fi
fi
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# muxtune scripts/install-prometheus.sh: do not start services during install\nexit 101\n' \
    | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
echo "install-prometheus: apt-get install prometheus (server + promtool)" >&2
log=$(mktemp)  # apt's own chatter (debconf notices) is shown only when it fails
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
command -v prometheus >/dev/null && command -v promtool >/dev/null
prometheus --version 2>&1 | head -1 >&2
