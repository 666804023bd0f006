#!/usr/bin/env bash
# Make sure headless Chromium is there for the browser tests (tests/e2e/test_report_browser.py).
# Installs Debian's `chromium` package when it is missing and apt-get can be used (root, or
# passwordless sudo). Never fails by itself: without Chromium the browser tests skip and say why, except
# under CI=true, where they fail.
set -u

for exe in chromium chromium-browser; do
    if command -v "$exe" >/dev/null 2>&1; then
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: no apt-get here; install Chromium yourself to run the browser tests" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure-chromium: not root and no passwordless sudo; the browser tests will skip" >&2
    exit 0
fi

echo "ensure-chromium: installing Debian's chromium package (once)"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q chromium >/tmp/ensure-chromium.log 2>&1; then
    # A fresh machine may have no package lists yet.
    $SUDO apt-get update -q >>/tmp/ensure-chromium.log 2>&1
    $SUDO apt-get install -y -q chromium >>/tmp/ensure-chromium.log 2>&1 \
        || echo "ensure-chromium: apt-get install chromium failed (see /tmp/ensure-chromium.log); the browser tests will skip" >&2
fi
exit 0
