#!/usr/bin/env bash
# Debian packages the bench needs and pip does not bring: wrk (the publish-API scenario's load
# generator). Installs only what is missing; `python -m bench` runs it first.
set -euo pipefail

if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "wrk is missing (install it as root: apt-get install wrk)" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "installing Debian package: wrk"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
