#!/usr/bin/env bash
# Make sure Debian's headless Chromium is installed for the browser test
# (tests/browser/). Playwright drives this system browser (its own browser
# download is not reachable from the build machines).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is missing: run 'sudo apt-get install -y chromium' (or make browser as root)" >&2
  exit 1
fi
echo "chromium is missing: installing it from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
# another apt-get on the machine (a teammate, unattended upgrades) holds the lock: wait for it
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
