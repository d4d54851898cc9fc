#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for Ferry: system tools (when root) and the venv.
#   scripts/setup.sh          what `ferry demo` runs (make demo): no dev tools, no lab
#   scripts/setup.sh --test   and what the tests run (make test): sshd, the QEMU lab, dev extras
# Only missing packages are installed; with everything in place it changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") profile=demo ;;
  --test) profile=test ;;
  *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

# package=a file it installs (how we tell it is there; a glob for the kernel)
DEMO=(
  tar=/bin/tar                       # the archiver's sources (local executor)
  rsync=/usr/bin/rsync               # transfer
  mariadb-client=/usr/bin/mysqldump  # the sample database's archive
)
TEST=(
  openssh-server=/usr/sbin/sshd openssh-client=/usr/bin/ssh  # the tests' sshd; ferry demo --ssh
  zstd=/usr/bin/zstd pigz=/usr/bin/pigz                      # reading archives back
  docker-compose=/usr/bin/docker-compose                     # tests/unit/test_deploy.py
  # the lab (tests/lab): a Debian kernel under QEMU and what its initramfs and shared/nbd.py use
  qemu-system-x86=/usr/bin/qemu-system-x86_64 'linux-image-amd64=/boot/vmlinuz-*-amd64'
  busybox-static=/bin/busybox dmsetup=/usr/sbin/dmsetup nbd-server=/usr/bin/nbd-server
  nbd-client=/usr/sbin/nbd-client nbdkit=/usr/bin/nbdkit libnbd-bin=/usr/bin/nbdfuse
  kmod=/usr/bin/kmod cpio=/usr/bin/cpio fuse3=/usr/bin/fusermount3 e2fsprogs=/usr/sbin/mke2fs
  procps=/usr/bin/pgrep
  # journal replay and filesystem signatures (tests/lab/test_journal_replay.py,
  # tests/unit/test_fs_signatures.py): the filesystems guests have, images of other types
  xfsprogs=/usr/sbin/mkfs.xfs reiserfsprogs=/usr/sbin/mkreiserfs genisoimage=/usr/bin/genisoimage
  squashfs-tools=/usr/bin/mksquashfs
  prometheus=/usr/bin/prometheus  # tests/integration/test_prometheus.py scrapes every service
)
wanted=("${DEMO[@]}")
[ $profile = test ] && wanted+=("${TEST[@]}")

missing=()
for entry in "${wanted[@]}"; do
  compgen -G "${entry#*=}" >/dev/null || missing+=("${entry%%=*}")
done
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] && ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  missing+=(python3-venv)  # Debian leaves `python3 -m venv` out of python3
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]}"
    # The tests start their own sshd on 127.0.0.1; keep the package from starting one on :22.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  else
    echo "setup: missing packages; install: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# A stamp per install, newer than pyproject.toml when current; the test install (dev
# extras) serves the demo too.
current=0
for stamp in .venv/.ferry-test $([ $profile = demo ] && echo .venv/.ferry-demo); do
  [ "$stamp" -nt pyproject.toml ] && current=1
done
if [ $current = 0 ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".$([ $profile = test ] && echo '[dev]')"
  touch ".venv/.ferry-$profile"
fi
