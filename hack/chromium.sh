#!/usr/bin/env bash
# Makes sure headless Chromium and its WebDriver (Debian's chromium and chromium-driver) are
# installed, for the IAM policy builder's browser test; installs them with apt when missing and
# this user may. Prints chromedriver's path, or nothing (with a warning) when it cannot.
set -euo pipefail
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "chromium: installing chromium and chromium-driver with apt (about 460 MB, once)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends chromium chromium-driver; } >&2 ||
      echo "chromium: WARNING: apt could not install chromium; the browser test will be skipped" >&2
  else
    echo "chromium: WARNING: chromium and chromium-driver are not installed (apt-get install chromium chromium-driver); the browser test will be skipped" >&2
  fi
fi
command -v chromedriver || true
