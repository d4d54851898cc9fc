"""Filesystem signatures in a device's first bytes: is this what the inventory says it is?

The archiver mounts a snapshot as the inventory's filesystem type only, never as what
`blkid` reads from the customer's bytes: a customer controls those bytes, and a crafted
image of another type (cramfs, minix, iso9660, squashfs ...) would otherwise be mounted by
a driver nobody meant to expose. So before mounting, the head of the device must carry the
inventory type's superblock magic, and no signature of any other type: either way a
`PermanentError` names what was (or was not) found, and nothing is mounted.

Pure: bytes in, findings or an error out (the offsets are those of libblkid and the
kernels' on-disk formats). `HEAD_BYTES` from the start of the device is enough for all.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import PermanentError

HEAD_BYTES = 65536 + 4096  # reiserfs and btrfs keep their superblock at 64 KiB

# the inventory's type -> the family whose signature it must carry
FAMILY = {"ext2": "ext", "ext3": "ext", "ext4": "ext", "xfs": "xfs", "reiserfs": "reiserfs",
          "btrfs": "btrfs", "jfs": "jfs"}


class SignatureError(PermanentError):
    """The device does not carry (only) the inventory's filesystem: it is not mounted."""


@dataclass(frozen=True)
class Signature:
    family: str
    offset: int
    what: str  # the magic, as a reader would look for it


def _at(head: bytes, offset: int, magic: bytes) -> bool:
    return head[offset:offset + len(magic)] == magic


def _u16(head: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", head, offset)[0]) if len(head) >= offset + 2 else -1


def _u32(head: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", head, offset)[0]) if len(head) >= offset + 4 else -1


def _ext(head: bytes) -> Signature | None:
    # s_magic 0xEF53 at 1024+56; a sane s_log_block_size (1 KiB << n, n <= 6) and inodes
    if _u16(head, 1080) == 0xEF53 and 0 <= _u32(head, 1048) <= 6 and _u32(head, 1024) > 0:
        return Signature("ext", 1080, "0xEF53")
    return None


def _xfs(head: bytes) -> Signature | None:
    if _at(head, 0, b"XFSB"):
        size = int(struct.unpack_from(">I", head, 4)[0]) if len(head) >= 8 else 0
        if 512 <= size <= 65536 and size & (size - 1) == 0:
            return Signature("xfs", 0, "XFSB")
    return None


def _reiserfs(head: bytes) -> Signature | None:
    for base in (65536, 8192):  # 3.6 (and 3.5 converted) / the old 3.5 layout
        if _at(head, base + 52, b"ReIsEr"):
            return Signature("reiserfs", base + 52, "ReIsEr")
    return None


def _btrfs(head: bytes) -> Signature | None:
    return Signature("btrfs", 65600, "_BHRfS_M") if _at(head, 65600, b"_BHRfS_M") else None


def _jfs(head: bytes) -> Signature | None:
    return Signature("jfs", 32768, "JFS1") if _at(head, 32768, b"JFS1") else None


def _cramfs(head: bytes) -> Signature | None:
    for base in (0, 512):  # at 0, or after a 512-byte boot block
        for magic in (b"\x45\x3d\xcd\x28", b"\x28\xcd\x3d\x45"):  # either endianness
            if _at(head, base, magic) and _at(head, base + 16, b"Compressed ROMFS"):
                return Signature("cramfs", base, "0x28CD3D45")
    return None


def _minix(head: bytes) -> Signature | None:
    if _ext(head) is not None:
        return None  # both keep a superblock at 1024; an ext one wins, as in libblkid
    magic = _u16(head, 1040)
    if magic in (0x137F, 0x138F, 0x2468, 0x2478):  # v1/v2, 14 or 30 char names
        imap, zmap, log_zone = _u16(head, 1028), _u16(head, 1030), _u16(head, 1034)
        if imap > 0 and zmap > 0 and log_zone == 0 and _u16(head, 1024) > 0:
            return Signature("minix", 1040, f"0x{magic:04X}")
    if _u16(head, 1048) == 0x4D5A:  # v3
        imap, zmap, log_zone = _u16(head, 1030), _u16(head, 1032), _u16(head, 1036)
        if imap > 0 and zmap > 0 and log_zone == 0 and _u32(head, 1024) > 0:
            return Signature("minix", 1048, "0x4D5A")
    return None


def _iso9660(head: bytes) -> Signature | None:
    if _at(head, 32769, b"CD001"):
        return Signature("iso9660", 32769, "CD001")
    for offset in range(32769, 32769 + 2048 * 4, 2048):  # a UDF volume recognition sequence
        if head[offset:offset + 5] in (b"BEA01", b"NSR02", b"NSR03"):
            return Signature("udf", offset, head[offset:offset + 5].decode())
    return None


def _squashfs(head: bytes) -> Signature | None:
    for magic in (b"hsqs", b"sqsh"):
        if _at(head, 0, magic):
            return Signature("squashfs", 0, magic.decode())
    return None


def _others(head: bytes) -> Signature | None:
    """Signatures that never hold a filesystem we archive: swap, LUKS, NTFS, FAT, erofs, f2fs."""
    for offset, magic, family in ((4086, b"SWAPSPACE2", "swap"), (4086, b"SWAP-SPACE", "swap"),
                                  (0, b"LUKS\xba\xbe", "luks"), (3, b"NTFS    ", "ntfs")):
        if _at(head, offset, magic):
            return Signature(family, offset, repr(magic)[2:-1])
    if _u16(head, 510) == 0xAA55 and (_at(head, 82, b"FAT32   ") or _at(head, 54, b"FAT1")):
        return Signature("vfat", 54 if _at(head, 54, b"FAT1") else 82, "FAT")
    if _u32(head, 1024) == 0xE0F5E1E2:
        return Signature("erofs", 1024, "0xE0F5E1E2")
    if _u32(head, 1024) == 0xF2F52010:
        return Signature("f2fs", 1024, "0xF2F52010")
    return None


PROBES: tuple[Callable[[bytes], Signature | None], ...] = (
    _ext, _xfs, _reiserfs, _btrfs, _jfs, _cramfs, _minix, _iso9660, _squashfs, _others)


def detect(head: bytes) -> list[Signature]:
    """Every filesystem signature found in `head` (the device's first bytes), in probe order."""
    return [found for probe in PROBES if (found := probe(head)) is not None]


def describe(found: list[Signature]) -> str:
    return ", ".join(f"{s.family} ({s.what} at byte {s.offset})" for s in found) or "none"


def require_known(fs_type: str, where: str) -> str:
    """The family of the inventory type `fs_type`. Raises SignatureError for a type the
    archiver does not mount (it has no signature to check it by)."""
    family = FAMILY.get(fs_type)
    if family is None:
        raise SignatureError(f"{where}: the inventory's filesystem type {fs_type!r} is not "
                             f"one the archiver mounts ({', '.join(sorted(FAMILY))})")
    return family


def check(fs_type: str, head: bytes, where: str) -> Signature:
    """The inventory type's signature in `head`. Raises SignatureError (permanent) naming
    `where` and what was found when the type is one we cannot check, its magic is missing,
    or any other filesystem's signature is present (a mount could pick the wrong driver)."""
    family = require_known(fs_type, where)
    if len(head) < HEAD_BYTES:
        raise SignatureError(f"{where}: only {len(head)} bytes, too small to hold a {fs_type} "
                             "filesystem")
    found = detect(head)
    ours = [s for s in found if s.family == family]
    others = [s for s in found if s.family != family]
    if not ours:
        raise SignatureError(f"{where}: no {fs_type} superblock (the inventory's type); "
                             f"signatures found: {describe(others)}; not mounted")
    if others:
        raise SignatureError(f"{where}: carries a {fs_type} superblock but also "
                             f"{describe(others)}; refusing to mount an ambiguous device")
    return ours[0]
