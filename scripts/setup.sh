#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for Ferry: system tools (when root) and the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(openssh-server openssh-client rsync tar zstd pigz mariadb-client docker-compose
  # the lab (tests/lab): a Debian kernel under QEMU and what its initramfs and shared/nbd.py use
  qemu-system-x86 linux-image-amd64 busybox-static dmsetup nbd-server nbd-client nbdkit libnbd-bin
  kmod cpio fuse3 e2fsprogs procps)

missing=()
for tool in /usr/sbin/sshd /usr/bin/ssh /usr/bin/rsync /usr/bin/zstd /usr/bin/pigz /usr/bin/mysqldump /usr/bin/docker-compose \
    /usr/bin/qemu-system-x86_64 /bin/busybox /usr/sbin/dmsetup /usr/bin/nbd-server /usr/sbin/nbd-client \
    /usr/bin/nbdkit /usr/bin/nbdfuse /usr/bin/kmod /usr/bin/cpio /usr/bin/fusermount3 /usr/sbin/mke2fs \
    /usr/bin/pgrep; do
  [ -x "$tool" ] || missing+=("$tool")
done
compgen -G '/boot/vmlinuz-*-amd64' >/dev/null || missing+=(/boot/vmlinuz-*-amd64)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${APT_PACKAGES[*]} (missing: ${missing[*]})"
    # The tests start their own sshd on 127.0.0.1; keep the package from starting one on :22.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
    [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  else
    echo "setup: missing ${missing[*]}; install: apt-get install ${APT_PACKAGES[*]}" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.ferry-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
