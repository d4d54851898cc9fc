"""Build test filesystem trees with the awkward things real ones have, and describe a tree
so two can be compared: names, types, modes, owners, sizes, contents, link targets, hard
links and holes.
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path

from shared.digests import file_sha256

NAMES = ["résumé", "日本語のファイル", "файл", "emoji-🚢", "space name", "tab\tname",
         "quote'\"name", "back\\slash", "dash-leading", "ünïcödé", "semi;colon", "$(dollar)"]
OWNERS = [(0, 0), (1000, 1000), (1001, 100), (33, 33), (65534, 65534), (4242, 4343)]
FILE_MODES = [0o644, 0o600, 0o755, 0o640, 0o444, 0o4755, 0o2755, 0o700]
DIR_MODES = [0o755, 0o700, 0o750, 0o1777, 0o2775]


@dataclass(frozen=True)
class Entry:
    kind: str  # file, dir, symlink, fifo
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str = ""
    target: str = ""  # symlink target
    link_group: str = ""  # for hard-linked files: the first path (by name) of the inode
    mtime: int = 0


def build_tree(root: Path, files: int, seed: int = 5) -> int:
    """Create `files` regular files (plus dirs, symlinks, hard links, sparse files and a fifo)
    under `root`, owned by several uids. Returns the number of entries made."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root]
    for index in range(max(1, files // 50)):
        parent = rng.choice(dirs)
        child = parent / f"{rng.choice(NAMES)}-d{index}"
        child.mkdir()
        dirs.append(child)
    made: list[Path] = []
    for index in range(files):
        path = rng.choice(dirs) / f"{rng.choice(NAMES)}-{index}.{rng.choice(['txt', 'bin', ''])}"
        size = rng.choice([0, 1, 100, 4096, 5000, 65536]) if index % 200 else 1 << 20
        data = (rng.randbytes(size) if index % 3 == 0
                else (f"line {index} " * (size // 8 + 1)).encode()[:size])
        path.write_bytes(data)
        os.utime(path, (1_600_000_000 + index, 1_600_000_000 + index))
        made.append(path)
    count = len(dirs) + len(made)
    for index in range(files // 25):  # hard links, some across directories
        source = rng.choice(made)
        link = rng.choice(dirs) / f"hard-{index}-{source.name[:20]}"
        os.link(source, link)
        count += 1
    for index in range(files // 25):  # symlinks: relative, absolute, dangling, to dirs
        link = rng.choice(dirs) / f"sym-{index}"
        target = rng.choice([os.path.relpath(rng.choice(made), link.parent),
                             "/etc/hostname", f"missing-{index}", "..", str(rng.choice(dirs))])
        link.symlink_to(target)
        count += 1
    for index in range(5):  # sparse: 64 MiB apparent, a few KiB of data
        path = rng.choice(dirs) / f"sparse-{index}.img"
        with path.open("wb") as handle:
            handle.truncate(64 << 20)
            handle.seek(rng.randrange(0, 60 << 20))
            handle.write(b"data in a hole" * 100)
        count += 1
    os.mkfifo(root / "a-fifo")
    for index, path in enumerate(sorted(root.rglob("*"))):
        uid, gid = OWNERS[index % len(OWNERS)]
        os.chown(path, uid, gid, follow_symlinks=False)
        if not path.is_symlink():
            modes = DIR_MODES if path.is_dir() else FILE_MODES
            os.chmod(path, modes[index % len(modes)])  # after chown: chown clears setuid
    return count + 1


def describe(root: Path) -> dict[str, Entry]:
    """Every entry under `root` by relative path (root itself as ".")."""
    entries: dict[str, Entry] = {}
    inodes: dict[tuple[int, int], str] = {}
    paths = sorted([root, *root.rglob("*")])
    for path in paths:
        rel = "." if path == root else str(path.relative_to(root))
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            entries[rel] = Entry("symlink", 0, info.st_uid, info.st_gid, 0,
                                 target=os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            entries[rel] = Entry("dir", mode, info.st_uid, info.st_gid, 0)
        elif stat.S_ISFIFO(info.st_mode):
            entries[rel] = Entry("fifo", mode, info.st_uid, info.st_gid, 0)
        else:
            group = inodes.setdefault((info.st_dev, info.st_ino), rel) if info.st_nlink > 1 else ""
            entries[rel] = Entry("file", mode, info.st_uid, info.st_gid, info.st_size,
                                 sha256=file_sha256(path), link_group=group,
                                 mtime=int(info.st_mtime))
    return entries


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512
