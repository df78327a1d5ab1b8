#!/bin/sh
# Build the guest image for the end-to-end tests from Debian packages: the
# kernel of Debian's linux-image-amd64 and an initramfs made of the host's
# busybox-static and the kernel's virtio modules. Nothing binary is kept in
# the repository, so every machine builds its own copy here.
#
# Environment:
#   BALLOONCTL_CACHE  cache root directory (default /var/cache/balloonctl).
#                     The image goes to $BALLOONCTL_CACHE/guest and the
#                     downloaded kernel package to $BALLOONCTL_CACHE/debs.
#
# Output: progress on stderr, then exactly two lines on stdout:
#   kernel=PATH
#   initramfs=PATH
#
# The script does nothing but print those lines when the stamp file in the
# image directory matches the current kernel package version, the busybox
# version and the SHA-256 of this script. It needs root, apt-get and the
# packages that scripts/install-deps.sh installs.
#
# Guest contract (see the /init script below):
#   - ttyS0 is the console: kernel messages and init's log lines.
#   - ttyS1 runs a non-interactive busybox sh with echo off, so whatever a
#     client writes there is executed line by line and only the commands'
#     output comes back. The shell is restarted if it exits.
#   - "balloonctl.balloon=0" on the kernel command line skips loading
#     virtio_balloon. Otherwise it is loaded after the virtio core modules.
#   - The modules are in /lib/modules/$(uname -r) with a modules.dep, so
#     `rmmod virtio_balloon` and `modprobe virtio_balloon` work.
set -eu

CACHE_ROOT=${BALLOONCTL_CACHE:-/var/cache/balloonctl}
GUEST_DIR=$CACHE_ROOT/guest
DEB_DIR=$CACHE_ROOT/debs
KERNEL_OUT=$GUEST_DIR/vmlinuz
INITRAMFS_OUT=$GUEST_DIR/initramfs.cpio.gz
STAMP=$GUEST_DIR/stamp
KERNEL_META_PACKAGE=linux-image-amd64

# Loaded in this order at boot. virtio_balloon follows them unless the
# kernel command line disables it.
CORE_MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci"
BALLOON_MODULE=virtio_balloon

log() {
    echo "build-guest: $*" >&2
}

die() {
    echo "build-guest: error: $*" >&2
    exit 1
}

print_paths() {
    echo "kernel=$KERNEL_OUT"
    echo "initramfs=$INITRAMFS_OUT"
}

# Print the name of the versioned kernel package that the meta package
# depends on, for example linux-image-6.1.0-57-amd64. Prints nothing when
# the apt lists do not contain the meta package.
resolve_kernel_package() {
    apt-cache show --no-all-versions "$KERNEL_META_PACKAGE" 2>/dev/null \
        | sed -n 's/^Depends: *//p' \
        | tr ',' '\n' \
        | sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' \
        | head -n 1
}

candidate_version() {
    apt-cache show --no-all-versions "$1" 2>/dev/null \
        | sed -n 's/^Version: *//p' \
        | head -n 1
}

package_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}

check_host() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it creates device nodes for the initramfs)"
    for tool in apt-get apt-cache dpkg-deb tar cpio gzip xz flock sha256sum; do
        command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh"
    done
    # The Debian package "busybox" also installs /bin/busybox, but linked
    # against the host's libc, and that binary cannot run in the initramfs.
    [ -n "$(package_version busybox-static)" ] \
        || die "package busybox-static is not installed; run scripts/install-deps.sh"
    [ -x /bin/busybox ] || die "/bin/busybox not found; reinstall busybox-static"
}

write_init() {
    cat >"$1" <<'INIT'
#!/bin/sh
# /init of the balloonctl end-to-end test guest, written by
# scripts/build-guest.sh.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

log() {
    echo "bctl-guest: $*"
}

MODULE_DIR=/lib/modules/$(uname -r)/kernel/drivers/virtio

load_module() {
    if insmod "$MODULE_DIR/$1.ko"; then
        log "loaded $1"
    else
        log "failed to load $1"
    fi
}

for module in @CORE_MODULES@; do
    load_module "$module"
done

load_balloon=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        balloonctl.balloon=0) load_balloon=0 ;;
    esac
done
if [ "$load_balloon" = 1 ]; then
    load_module @BALLOON_MODULE@
else
    log "@BALLOON_MODULE@ not loaded (balloonctl.balloon=0)"
fi

# Without echo the client reads back only the commands' output, and
# without onlcr a newline stays "\n" instead of "\r\n".
stty -F /dev/ttyS1 -echo -onlcr

# This shell and the command shells it starts inherit -1000, so the OOM
# killer never picks them. A client that runs a memory-hungry command
# raises its own process's oom_score_adj back to 0 first, as the test
# harness's Guest.run() does.
echo -1000 >/proc/self/oom_score_adj

log "shell ready on ttyS1"
# stdout is a pipe, not a tty, so sh runs non-interactively: no prompt and
# no line editing. If sh dies, cat reaches end of file and the loop starts
# a new pair without losing the next input line.
while true; do
    sh </dev/ttyS1 2>&1 | cat >/dev/ttyS1
    log "shell on ttyS1 exited; restarting it"
    sleep 1
done
INIT
    sed -i \
        -e "s/@CORE_MODULES@/$CORE_MODULES/" \
        -e "s/@BALLOON_MODULE@/$BALLOON_MODULE/g" \
        "$1"
    chmod 0755 "$1"
}

# Download the kernel package into $DEB_DIR unless it is already there and
# print the path of the .deb file. Older versions of it are removed.
fetch_kernel_deb() {
    package=$1
    version=$2
    deb=$DEB_DIR/${package}_${version}_amd64.deb
    if [ -f "$deb" ]; then
        log "using downloaded $deb"
    else
        mkdir -p "$DEB_DIR"
        rm -f "$DEB_DIR/${package}"_*.deb
        download_dir=$(mktemp -d "$DEB_DIR/download.XXXXXX")
        # apt-get download runs as the _apt user where it exists and warns
        # when that user cannot write the target directory.
        if getent passwd _apt >/dev/null; then
            chown _apt "$download_dir"
        fi
        log "downloading $package=$version"
        (cd "$download_dir" && apt-get download "$package=$version" >&2)
        mv "$download_dir/${package}_${version}_amd64.deb" "$deb"
        rmdir "$download_dir"
    fi
    echo "$deb"
}

# Extract the kernel and the virtio modules of $1 (a .deb) into $2 and print
# the kernel release found in it, for example 6.1.0-57-amd64.
extract_kernel() {
    deb=$1
    dest=$2
    log "extracting the kernel and virtio modules from $deb"
    dpkg-deb --fsys-tarfile "$deb" \
        | tar -x -C "$dest" --wildcards --no-anchored \
            'boot/vmlinuz-*' 'kernel/drivers/virtio/*'
    # Debian 12 installs modules under /lib/modules, and later releases
    # under /usr/lib/modules.
    for release_dir in "$dest"/lib/modules/* "$dest"/usr/lib/modules/*; do
        if [ -d "$release_dir" ]; then
            basename "$release_dir"
            return
        fi
    done
    die "no lib/modules directory in $deb"
}

# Copy module $1 from directory $2 into directory $3 as an uncompressed .ko,
# so that insmod works whichever decompressors busybox was built with.
install_module() {
    name=$1
    src=$2
    dest=$3
    if [ -f "$src/$name.ko" ]; then
        cp "$src/$name.ko" "$dest/$name.ko"
        log "module: $name.ko"
    elif [ -f "$src/$name.ko.xz" ]; then
        xz -dc "$src/$name.ko.xz" >"$dest/$name.ko"
        log "module: $name.ko.xz (decompressed)"
    else
        die "module $name not found in $src (only .ko and .ko.xz are supported)"
    fi
}

build_initramfs() {
    extracted=$1
    kernel_release=$2
    root=$3
    output=$4

    mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/mnt" "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    mknod -m 0600 "$root/dev/console" c 5 1
    write_init "$root/init"

    src=""
    for candidate in "$extracted/lib/modules/$kernel_release/kernel/drivers/virtio" \
        "$extracted/usr/lib/modules/$kernel_release/kernel/drivers/virtio"; do
        [ -d "$candidate" ] && src=$candidate
    done
    [ -n "$src" ] || die "virtio module directory not found for $kernel_release"
    module_dir=$root/lib/modules/$kernel_release/kernel/drivers/virtio
    mkdir -p "$module_dir"
    for module in $CORE_MODULES $BALLOON_MODULE; do
        install_module "$module" "$src" "$module_dir"
    done
    /bin/busybox depmod -b "$root" "$kernel_release"

    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
        | gzip -9 >"$output"
}

main() {
    check_host
    mkdir -p "$GUEST_DIR"
    # Serialise concurrent builds that share one cache directory.
    exec 9>"$CACHE_ROOT/guest.lock"
    flock 9

    script_hash=$(sha256sum "$0" | cut -d' ' -f1)
    busybox_version=$(package_version busybox-static)

    kernel_package=$(resolve_kernel_package)
    if [ -z "$kernel_package" ]; then
        if [ -f "$STAMP" ] && grep -qx "script_sha256=$script_hash" "$STAMP" \
            && [ -f "$KERNEL_OUT" ] && [ -f "$INITRAMFS_OUT" ]; then
            log "$KERNEL_META_PACKAGE not found in the apt lists; keeping the cached image"
            print_paths
            return
        fi
        log "$KERNEL_META_PACKAGE not found in the apt lists; running apt-get update"
        apt-get update >&2
        kernel_package=$(resolve_kernel_package)
        [ -n "$kernel_package" ] || die "package $KERNEL_META_PACKAGE not found by apt-cache"
    fi
    kernel_version=$(candidate_version "$kernel_package")
    [ -n "$kernel_version" ] || die "no candidate version for $kernel_package"

    wanted_stamp=$(printf 'kernel_package=%s\nkernel_version=%s\nbusybox_version=%s\nscript_sha256=%s\n' \
        "$kernel_package" "$kernel_version" "$busybox_version" "$script_hash")
    if [ -f "$STAMP" ] && [ -f "$KERNEL_OUT" ] && [ -f "$INITRAMFS_OUT" ] \
        && [ "$(cat "$STAMP")" = "$wanted_stamp" ]; then
        log "cached image is up to date ($kernel_package $kernel_version)"
        print_paths
        return
    fi

    log "building the guest image with $kernel_package $kernel_version"
    work=$(mktemp -d "$CACHE_ROOT/guest-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT

    deb=$(fetch_kernel_deb "$kernel_package" "$kernel_version")
    mkdir "$work/extracted"
    kernel_release=$(extract_kernel "$deb" "$work/extracted")
    log "kernel release: $kernel_release"
    build_initramfs "$work/extracted" "$kernel_release" "$work/root" "$work/initramfs.cpio.gz"

    # The stamp is written last, so an interrupted build is rebuilt next time.
    rm -f "$STAMP"
    mv "$work/extracted/boot/vmlinuz-$kernel_release" "$KERNEL_OUT"
    mv "$work/initramfs.cpio.gz" "$INITRAMFS_OUT"
    printf '%s\n' "$wanted_stamp" >"$STAMP"
    log "kernel: $KERNEL_OUT ($(stat -c %s "$KERNEL_OUT") bytes)"
    log "initramfs: $INITRAMFS_OUT ($(stat -c %s "$INITRAMFS_OUT") bytes)"
    print_paths
}

main "$@"
