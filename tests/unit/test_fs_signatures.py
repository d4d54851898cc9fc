"""shared.fs_signatures on images made by the real mkfs tools (scripts/setup.sh --test)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shared.fs_signatures import HEAD_BYTES, SignatureError, check, detect

# the small XFS customers' old xfsprogs made; mkfs.xfs >= 5.19 wants these to go below 300 MB
SMALL_XFS = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def image(tmp_path: Path, name: str, mib: int = 40) -> Path:
    path = tmp_path / f"{name}.img"
    with path.open("wb") as disk:
        disk.truncate(mib << 20)
    return path


def run(*argv: str | Path, env: dict[str, str] | None = None) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True,
                   env={**os.environ, **(env or {})})


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir(exist_ok=True)
    (root / "hello.txt").write_text("hello\n")
    return root


def make(kind: str, tmp_path: Path) -> Path:
    """An image of `kind` made by its real tool."""
    if kind in ("ext2", "ext3", "ext4"):
        path = image(tmp_path, kind, 16)
        run("mke2fs", "-q", "-F", "-t", kind, path)
    elif kind == "xfs":
        path = image(tmp_path, kind, 32)
        run("mkfs.xfs", "-q", "-f", path, env=SMALL_XFS)
    elif kind == "reiserfs":
        path = image(tmp_path, kind, 40)
        run("mkreiserfs", "-q", "-f", path)
    elif kind.startswith("minix"):
        path = image(tmp_path, kind, 8)
        run("mkfs.minix", f"-{kind[-1]}", path)
    elif kind == "cramfs":
        path = tmp_path / "cramfs.img"
        run("mkfs.cramfs", tree(tmp_path), path)
    elif kind == "iso9660":
        path = tmp_path / "cd.iso"
        run("genisoimage", "-quiet", "-o", path, tree(tmp_path))
    elif kind == "squashfs":
        path = tmp_path / "sq.img"
        run("mksquashfs", tree(tmp_path), path, "-quiet", "-noappend")
    else:
        raise AssertionError(kind)
    return path


def head(path: Path) -> bytes:
    """The device's first HEAD_BYTES, zero-padded like the rest of a larger disk would be."""
    with path.open("rb") as device:
        data = device.read(HEAD_BYTES)
    return data + bytes(HEAD_BYTES - len(data))


@pytest.mark.parametrize(("kind", "family"), [
    ("ext2", "ext"), ("ext3", "ext"), ("ext4", "ext"), ("xfs", "xfs"), ("reiserfs", "reiserfs"),
    ("minix1", "minix"), ("minix2", "minix"), ("minix3", "minix"), ("cramfs", "cramfs"),
    ("iso9660", "iso9660"), ("squashfs", "squashfs"),
])
def test_each_real_image_shows_exactly_its_own_signature(
    kind: str, family: str, tmp_path: Path,
) -> None:
    assert [s.family for s in detect(head(make(kind, tmp_path)))] == [family]


@pytest.mark.parametrize("fs_type", ["ext2", "ext3", "ext4", "xfs", "reiserfs"])
def test_the_inventory_type_on_its_own_image_passes(fs_type: str, tmp_path: Path) -> None:
    found = check(fs_type, head(make(fs_type, tmp_path)), "xen1:/dev/vg0/vm1")
    assert found.family == ("ext" if fs_type.startswith("ext") else fs_type)


@pytest.mark.parametrize("kind", ["cramfs", "minix1", "minix3", "iso9660", "squashfs", "xfs"])
def test_an_image_of_another_type_is_refused_naming_what_it_holds(
    kind: str, tmp_path: Path,
) -> None:
    # Given a customer's disk the inventory calls ext4 that holds another filesystem's image
    data = head(make(kind, tmp_path))
    # Then the check refuses it, naming the device, the missing type and what it found
    with pytest.raises(SignatureError) as refused:
        check("ext4", data, "xen1:/dev/vg0/vm1")
    message = str(refused.value)
    assert message.startswith("xen1:/dev/vg0/vm1: no ext4 superblock")
    assert detect(data)[0].family in message


def test_a_real_ext4_that_also_carries_an_iso9660_descriptor_is_refused(tmp_path: Path) -> None:
    # Given a real ext4 whose bytes also hold an iso9660 volume descriptor (a hybrid image)
    data = bytearray(head(make("ext4", tmp_path)))
    data[32768:32774] = b"\x01CD001"
    # Then it is refused as ambiguous, although the ext4 superblock is there
    with pytest.raises(SignatureError, match=r"ext4 superblock but also iso9660 \(CD001 at "
                                             r"byte 32769\)"):
        check("ext4", bytes(data), "xen1:/dev/vg0/vm1")


def test_an_empty_device_an_unknown_type_and_a_short_read_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="no xfs superblock .*signatures found: none"):
        check("xfs", bytes(HEAD_BYTES), "xen1:/dev/vg0/vm1")
    with pytest.raises(SignatureError, match="'ntfs' is not one the archiver mounts"):
        check("ntfs", head(make("ext4", tmp_path)), "xen1:/dev/vg0/vm1")
    with pytest.raises(SignatureError, match="only 1024 bytes"):
        check("ext4", bytes(1024), "xen1:/dev/vg0/vm1")
