#!/bin/sh
# Install the Debian packages that the end-to-end tests need and create the
# libvirt-qemu system user. Safe to run again: it installs only what is
# missing and runs `apt-get update` at most once, only when installing.
#
# Run as root on Debian 12 (bookworm). It needs only the Debian package
# mirror. libvirt-python itself comes from PyPI through the project's own
# Python tooling; pip builds it from source, which is why gcc, pkg-config,
# libvirt-dev and python3-dev are in this list. python3-venv lets Debian's
# own python3 create the project's virtual environment.
set -eu

PACKAGES="
    python3-venv
    python3-dev
    libvirt-daemon
    libvirt-daemon-driver-qemu
    libvirt-clients
    libvirt-dev
    qemu-system-x86
    busybox-static
    xz-utils
    cpio
    gzip
    pkg-config
    gcc
    util-linux
    mount
    passwd
"

log() {
    echo "install-deps: $*"
}

# A package counts as installed only in the "install ok installed" state,
# so half-configured or removed-but-configured packages get reinstalled.
missing=""
for package in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    if [ "$status" = "install ok installed" ]; then
        log "$package is installed"
    else
        missing="$missing $package"
    fi
done

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: $1 is missing; run this script as root to install it" >&2
        exit 1
    fi
}

if [ -n "$missing" ]; then
    require_root "package(s)$missing"
    log "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # $missing is a space-separated list of package names and is split on purpose.
    # shellcheck disable=SC2086
    apt-get install -y $missing
else
    log "all packages are installed"
fi

# libvirtd 9.0 (Debian 12) fails to load its QEMU driver unless the user
# libvirt-qemu exists, even when qemu.conf runs guests as root. Debian's
# libvirt-daemon-system package would create it, but that package also
# brings polkitd, iptables, a default network and init scripts, none of
# which these tests use.
if getent passwd libvirt-qemu >/dev/null; then
    log "user libvirt-qemu exists"
else
    require_root "user libvirt-qemu"
    log "creating system user libvirt-qemu"
    useradd --system --user-group --no-create-home \
        --home-dir /var/lib/libvirt --shell /usr/sbin/nologin \
        --comment "libvirt QEMU" libvirt-qemu
fi

log "done"
