#!/usr/bin/env bash
# Makes sure a headless-capable Chromium is installed (Debian's `chromium`
# package), for the status-page test. Fails loudly if it cannot.
set -euo pipefail

for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null 2>&1; then
    echo "ensure-chromium: $(command -v "$b")"
    exit 0
  fi
done

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "ensure-chromium: need root to run: $*" >&2; return 1; fi
}

echo "ensure-chromium: installing Debian's chromium package"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
if ! command -v chromium >/dev/null 2>&1; then
  echo "ensure-chromium: FAILED: chromium is still missing after apt-get install" >&2
  exit 1
fi
echo "ensure-chromium: $(command -v chromium)"
