#!/usr/bin/env bash
# Installs the system packages the tests and the demo use (mosquitto) when missing.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto openssl >/dev/null
# The Debian package starts a system broker; the tests start their own on free ports.
($SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true)
