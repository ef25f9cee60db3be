#!/usr/bin/env bash
# Headless Chromium + ChromeDriver for the browser test (tests/test_ui_browser.py): Debian's packages
# chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver). Idempotent: installs only
# what is missing. Needs root (apt-get) and the Debian package registry, nothing else.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "${SREC_SKIP_BROWSER:-0}" = "1" ]; then
  echo "setup_browser: chromium/chromedriver missing; SREC_SKIP_BROWSER=1, so the browser test is skipped" >&2
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "setup_browser: /usr/bin/chromium or /usr/bin/chromedriver is missing and installing them needs root." >&2
  echo "  run as root:  apt-get update && apt-get install -y chromium chromium-driver fonts-liberation" >&2
  echo "  or set SREC_SKIP_BROWSER=1 to skip the browser test (tests/test_ui_browser.py)." >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser: chromium/chromedriver missing and there is no apt-get (not Debian/Ubuntu);" \
       "install Chromium and a matching ChromeDriver at /usr/bin/chromium and /usr/bin/chromedriver," \
       "or set SREC_SKIP_BROWSER=1" >&2
  exit 1
fi
echo "setup_browser: installing Debian's chromium, chromium-driver and fonts-liberation (first run only)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# With Debian's recommends (fonts-liberation, mesa ...): the set the browser test was checked with.
apt-get install -y -qq chromium chromium-driver fonts-liberation >/dev/null
for f in /usr/bin/chromium /usr/bin/chromedriver; do
  if [ ! -x "$f" ]; then
    echo "setup_browser: $f still missing after apt-get install chromium chromium-driver" >&2
    exit 1
  fi
done
echo "setup_browser: $(/usr/bin/chromium --version 2>/dev/null | tail -1 || echo chromium), $(/usr/bin/chromedriver --version | head -1)"
