#!/usr/bin/env bash
# Install everything siterecovery needs on Debian 12: qemu tools, libnbd, a venv.
# Idempotent; run as root (or with sudo available). Used by the README and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for cmd in qemu-img qemu-storage-daemon nbdcopy rsync; do
  command -v "$cmd" >/dev/null 2>&1 || need_apt=1
done
/usr/bin/python3 -c "import nbd, venv" >/dev/null 2>&1 || need_apt=1
[ -x /usr/lib/postgresql/15/bin/pg_ctl ] || need_apt=1  # the PostgreSQL vault tests
[ -x /usr/bin/chromium ] || need_apt=1  # the portal's browser tests (never `playwright install`)
/usr/bin/python3 -c "import libvirt" >/dev/null 2>&1 || need_apt=1  # the libvirt provider
command -v libvirtd >/dev/null 2>&1 || need_apt=1
if [ "$need_apt" = 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    qemu-utils qemu-system-x86 nbdkit python3-libnbd libnbd-bin python3-venv python3-dev rsync postgresql chromium \
    libvirt-daemon-system libvirt-clients python3-libvirt >/dev/null
fi

# libnbd's Python module exists only as a Debian package: the venv is made from
# Debian's python3 with --system-site-packages so that `import nbd` works.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev,postgres]'
.venv/bin/python -c "import nbd, siterecovery" >/dev/null

# Azurite (the Azure Storage emulator) for the page-blob replica store's tests,
# from npm into .azurite/ (git-ignored); skipped when that version is there.
AZURITE_VERSION=3.37.0
if ! grep -qs "\"version\": \"$AZURITE_VERSION\"" .azurite/node_modules/azurite/package.json; then
  if ! command -v npm >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  npm install --prefix .azurite --no-fund --no-audit --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null
fi
