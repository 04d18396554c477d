#!/usr/bin/env bash
# Run the cgroup v2 tests (tests/test_cgroup_v2_vm.py and tests/test_cgroups.py) in a pure cgroup v2
# VM: Debian's 6.1 kernel booted by virtme-ng in qemu (software emulation) with
# cgroup_no_v1=all, the host's filesystem shared read-only over 9p, results written to a
# shared directory. Installs what is missing (as root: qemu-system-x86, busybox-static,
# udev, kmod with apt; virtme-ng with pip into its own venv; the kernel package unpacked
# into a cache, never installed). Idempotent.
#
# Exit status: pytest's inside the VM, or 77 when the VM cannot start (the reason is printed
# as "cgroup v2 VM could not start: <why>").
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
UNAVAILABLE=77
CACHE="${EXECBOX_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/execbox-vm}"
VIRTME_NG_VERSION="1.42"
GUEST_PYTHON=/usr/bin/python3  # the system 3.11 starts fast under emulation

unavailable() {
    echo "cgroup v2 VM could not start: $*" >&2
    exit "$UNAVAILABLE"
}

# -- inside the VM ---------------------------------------------------------------------
if [ "${1:-}" = "--in-guest" ]; then
    results="$2"
    shift 2
    # Simulate a delegated cgroup, as systemd's Delegate=yes would: controllers enabled
    # at the root, this shell (and so pytest) moved into a cgroup of its own.
    echo "+memory +pids +cpu" > /sys/fs/cgroup/cgroup.subtree_control
    mkdir -p /sys/fs/cgroup/test-delegated
    echo $$ > /sys/fs/cgroup/test-delegated/cgroup.procs
    # Sandboxed steps idmap their working directory; 6.1 cannot idmap the overlay /tmp,
    # ext4 it can.
    if modprobe loop && truncate -s 256M /tmp/scratch.img && mkfs.ext4 -q -F /tmp/scratch.img \
            && mkdir -p /tmp/scratch && mount -o loop /tmp/scratch.img /tmp/scratch; then
        export TMPDIR=/tmp/scratch
    else
        echo "vm: no ext4 scratch directory; sandboxed tests will fail" >&2
    fi
    site=$(echo "$REPO"/.venv/lib/python3.*/site-packages)
    export PYTHONPATH="$REPO/src:$site" PYTHONDONTWRITEBYTECODE=1 EXECBOX_IN_VM=1
    # A thousand steps under software emulation take minutes; the host suite runs them.
    # pytest's pid and start time name the step cgroups it makes itself: a leftover's name
    # then says whether the tests or a supervisor made it.
    (echo "vm: pytest is pid $BASHPID, started at tick $(cut -d' ' -f22 /proc/$BASHPID/stat)"
     exec "$GUEST_PYTHON" -m pytest -p no:cacheprovider -o addopts="" -rs -v --durations=5 \
        -k "not thousand" \
        --junitxml="$results/junit.xml" "$@" tests/test_cgroup_v2_vm.py tests/test_cgroups.py) \
        > "$results/output" 2>&1
    echo $? > "$results/status"
    exit 0
fi

# -- on the host -----------------------------------------------------------------------
[ "$(uname -m)" = x86_64 ] || unavailable "needs an x86_64 host, this is $(uname -m)"
[ -x "$GUEST_PYTHON" ] || unavailable "$GUEST_PYTHON is missing"

missing_debs() {
    command -v qemu-system-x86_64 >/dev/null || echo qemu-system-x86
    command -v busybox >/dev/null || echo busybox-static
    [ -x /lib/systemd/systemd-udevd ] || echo udev  # virtme-ng finds its script ports with it
    command -v depmod >/dev/null || [ -x /usr/sbin/depmod ] || echo kmod
}

install_debs() {
    local debs
    debs=$(missing_debs | tr '\n' ' ')
    [ -z "${debs// /}" ] && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        || unavailable "missing $debs and not root with apt-get to install them"
    echo "vm: installing $debs" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $debs >/dev/null 2>&1 \
        || unavailable "apt-get install $debs failed"
}

install_vng() {
    [ -x "$CACHE/venv/bin/vng" ] && return 0
    echo "vm: installing virtme-ng $VIRTME_NG_VERSION into $CACHE/venv" >&2
    python3 -m venv "$CACHE/venv" >/dev/null 2>&1 || unavailable "python3 -m venv failed"
    "$CACHE/venv/bin/pip" install -q --disable-pip-version-check \
        "virtme-ng==$VIRTME_NG_VERSION" >/dev/null 2>&1 || unavailable "pip install virtme-ng failed"
}

# The kernel package is unpacked, not installed: it is only a file qemu boots.
install_kernel() {
    local found package
    found=$(ls "$CACHE"/kernel/boot/vmlinuz-* 2>/dev/null | head -1)
    if [ -n "$found" ]; then KERNEL="$found"; return 0; fi
    command -v apt-get >/dev/null || unavailable "no apt-get to download a kernel"
    package=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$package" ] && [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1
        package=$(apt-cache depends linux-image-amd64 2>/dev/null \
            | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [ -n "$package" ] || unavailable "apt knows no linux-image-amd64"
    echo "vm: downloading $package into $CACHE/kernel" >&2
    rm -rf "$CACHE/download" "$CACHE/kernel"
    mkdir -p "$CACHE/download"
    (cd "$CACHE/download" && apt-get download -q "$package" >/dev/null 2>&1) \
        || unavailable "apt-get download $package failed"
    dpkg -x "$CACHE"/download/*.deb "$CACHE/kernel.tmp" || unavailable "dpkg -x failed"
    local version
    version=$(ls "$CACHE/kernel.tmp/lib/modules")
    PATH="$PATH:/usr/sbin:/sbin" depmod -b "$CACHE/kernel.tmp" "$version" \
        || unavailable "depmod failed"
    mv "$CACHE/kernel.tmp" "$CACHE/kernel"
    rm -rf "$CACHE/download"
    KERNEL=$(ls "$CACHE"/kernel/boot/vmlinuz-* | head -1)
}

mkdir -p "$CACHE" || unavailable "cannot create $CACHE"
install_debs
install_vng
KERNEL=""
install_kernel
./scripts/setup.sh >/dev/null || unavailable "scripts/setup.sh failed"

results=$(mktemp -d "${TMPDIR:-/tmp}/execbox-vm.XXXXXX")
trap 'rm -rf "$results"' EXIT
started=$(date +%s)
# vng runs qemu as its child; our caller stops the whole process group on a timeout.
PATH="$CACHE/venv/bin:$PATH" "$CACHE/venv/bin/vng" --force-9p --disable-kvm \
    --cpus 2 --memory 1G --run "$KERNEL" --rwdir "$results" --append "cgroup_no_v1=all" \
    --exec "$REPO/scripts/vm-cgroup-v2.sh --in-guest $results $*" \
    < /dev/null > "$results/console" 2>&1
vm_status=$?
elapsed=$(( $(date +%s) - started ))
if [ ! -f "$results/status" ]; then
    tail -n 20 "$results/console" >&2
    unavailable "the VM exited with status $vm_status before the tests ran"
fi
cat "$results/output"
echo "cgroup v2 VM: $(basename "$KERNEL"), pytest status $(cat "$results/status"), ${elapsed}s"
exit "$(cat "$results/status")"
