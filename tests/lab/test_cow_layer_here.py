"""shared.nbd's COW layer on this machine alone (no guest, a few seconds): a crash-consistent
image with a dirty journal, served read-only by a real nbd-server on 127.0.0.1, is mounted
with its journal replayed and the served image unchanged; a killed owner's nbdkit, nbdfuse,
loop and mount are undone by the reconciler. The QEMU lab proves the same on real
snapshots (test_journal_replay); this is the quick check of the same code."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import nbd
from tests.lab.flow import host_leftovers
from tests.support.helpers import wait_for
from tests.support.sshd import free_port

ROOT = Path(__file__).resolve().parents[2]
SMALL_XFS = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def crash_consistent(tmp: Path, fs_type: str) -> tuple[Path, str]:
    """An image of `fs_type` copied while mounted, right after a file was fsync'ed: its
    journal holds the file, not yet checkpointed (what a dom0 snapshot holds); its sha256."""
    live, mnt = tmp / f"live-{fs_type}.img", tmp / f"mnt-{fs_type}"
    with live.open("wb") as disk:
        disk.truncate(32 << 20)
    mkfs = (["mkfs.xfs", "-q", "-f"] if fs_type == "xfs" else ["mke2fs", "-q", "-F", "-t", fs_type])
    subprocess.run([*mkfs, str(live)], check=True, capture_output=True,
                   env={**os.environ, **SMALL_XFS})
    mnt.mkdir()
    loop = subprocess.run(["losetup", "-f", "--show", str(live)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-t", fs_type, loop, str(mnt)], check=True, capture_output=True)
        try:
            fd = os.open(mnt / "committed.txt", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"committed, fsync'ed, not checkpointed\n")
            os.fsync(fd)
            os.close(fd)
            snap = tmp / f"snap-{fs_type}.img"
            subprocess.run(["cp", "--sparse=always", str(live), str(snap)], check=True)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    return snap, hashlib.sha256(snap.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, dict[str, Path]]]:
    """nbd-server on 127.0.0.1 serving read-only an ext4 and an XFS crash-consistent image."""
    images = {fs: crash_consistent(tmp_path, fs)[0] for fs in ("ext4", "xfs")}
    port = free_port()
    config = tmp_path / "nbd.conf"
    config.write_text(f"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n"
                      "    allowlist = false\n" + "".join(
                          f"[{fs}]\n    exportname = {path}\n    readonly = true\n"
                          for fs, path in images.items()))
    pidfile = tmp_path / "nbd.pid"
    subprocess.run(["nbd-server", "-C", str(config), "-p", str(pidfile)], check=True)
    try:
        wait_for(pidfile.exists, timeout=10, what=f"nbd-server's pidfile {pidfile}")
        yield port, images
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)


def old_way(image: Path, fs_type: str, mnt: Path) -> bool:
    """Is committed.txt there when mounted as the archiver did before (read-only device,
    journal skipped)?"""
    mnt.mkdir(exist_ok=True)
    options = "ro,norecovery,nouuid" if fs_type == "xfs" else "ro,noload"
    subprocess.run(["mount", "-t", fs_type, "-o", f"loop,{options}", str(image), str(mnt)],
                   check=True, capture_output=True)
    try:
        return (mnt / "committed.txt").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_the_journal_is_replayed_into_the_cow_and_the_served_image_is_untouched(
    fs_type: str, served: tuple[int, dict[str, Path]], tmp_path: Path,
) -> None:
    port, images = served
    image = images[fs_type]
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    # Given a crash-consistent image whose fsync'ed file the old way does not see
    assert not old_way(image, fs_type, tmp_path / "old")
    run_dir = tmp_path / "nbd"
    # When it is attached through the COW layer and mounted as the inventory's type
    with nbd.attach_export(None, fs_type, port, fs_type=fs_type, run_dir=run_dir) as mounted:
        # Then the journal was replayed: the file is there
        assert (mounted / "committed.txt").read_text().startswith("committed")
        state = json.loads((mounted.parent / "state.json").read_text())
        assert state["nbdkit_pid"] and state["loop"] and state["mounted"] == str(mounted)
    # ... nothing reached the served image, and nothing is left here
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    assert host_leftovers(run_dir) == [] and list(run_dir.iterdir()) == []


HOLD = """
import sys, time
from pathlib import Path
from shared import nbd
with nbd.attach_export(None, "ext4", int(sys.argv[1]), fs_type="ext4",
                       run_dir=Path(sys.argv[2])) as mounted:
    print("MOUNTED", mounted, flush=True)
    time.sleep(3600)
"""


def test_a_killed_owners_cow_layer_is_undone_by_the_reconciler(
    served: tuple[int, dict[str, Path]], tmp_path: Path,
) -> None:
    port, _ = served
    run_dir = tmp_path / "nbd"
    # Given a process that holds an attachment, SIGKILLed (no finally runs)
    held = subprocess.Popen([sys.executable, "-c", HOLD, str(port), str(run_dir)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout is not None
        line = held.stdout.readline()
        assert line.startswith("MOUNTED"), line
    finally:
        held.kill()
        held.wait(timeout=30)
    left = {entry.split()[0] for entry in host_leftovers(run_dir)}
    assert {"nbdkit", "nbdfuse"} <= left
    # When the reconciler runs
    cleaned = nbd.reconcile(run_dir)
    # Then the mount, loop, nbdfuse and nbdkit (its overlay with it) are gone
    assert cleaned == [line.split()[1].rsplit("/", 1)[0]]
    assert host_leftovers(run_dir) == [] and list(run_dir.iterdir()) == []
