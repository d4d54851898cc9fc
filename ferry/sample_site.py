"""Sample old-site data for `ferry demo` and the benchmarks: trees that look like real ones.

Deterministic for a seed: text that compresses like configs and logs, binaries that don't,
a few large files, symlinks, and the usual root filesystem layout.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

_WORDS = ("server", "listen", "upstream", "timeout", "worker", "cache", "error", "request",
          "session", "user", "deploy", "release", "shared", "config", "database", "host",
          "GET", "POST", "/assets/app.js", "200", "304", "404", "rails", "nginx", "unicorn")
ROOT_DIRS = ("etc", "usr/bin", "usr/lib", "usr/share/doc", "var/log", "var/lib", "home/deploy",
             "opt/app/releases", "root", "proc", "sys", "dev", "run", "tmp")


@dataclass(frozen=True)
class TreeSize:
    """How much a tree holds: `files` small ones and `large` big ones of `large_bytes` each."""

    files: int
    large: int
    large_bytes: int

    @property
    def approx_bytes(self) -> int:
        return self.files * 6_000 + self.large * self.large_bytes


SIZES = {
    "small": {"root": TreeSize(400, 1, 2 << 20), "data": TreeSize(2_000, 3, 4 << 20)},
    "medium": {"root": TreeSize(3_000, 4, 24 << 20), "data": TreeSize(8_000, 12, 48 << 20)},
}


def _lines(rng: random.Random, count: int = 4096) -> list[bytes]:
    return [
        (f"{rng.randint(0, 99999):05d} "
         + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
         + f" {rng.random():.6f}\n").encode()
        for _ in range(count)
    ]


def _text(rng: random.Random, pool: list[bytes], size: int) -> bytes:
    # Sampling from a pool of generated lines: fast, and compresses like real logs.
    picked = rng.choices(pool, k=size // 40 + 1)
    return b"".join(picked)[:size]


def _binary(rng: random.Random, size: int) -> bytes:
    # Mostly incompressible with some zero padding: like compiled code, images, archives.
    random_part = rng.randbytes(size - size // 5)
    return random_part + bytes(size - len(random_part))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_tree(root: Path, size: TreeSize, *, seed: int, rootfs: bool = False) -> int:
    """Fill `root` with a tree of about size.approx_bytes; returns the bytes written."""
    rng = random.Random(seed)  # noqa: S311 - sample data, not secrets
    pool = _lines(rng)
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root / d for d in ROOT_DIRS] if rootfs else [root / "shared", root / "uploads",
                                                          root / "cache", root / "system"]
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(size.files):
        directory = rng.choice(dirs)
        if rootfs and directory.name in {"proc", "sys", "dev", "run", "tmp"}:
            directory = root / "etc"
        sub = directory / f"d{rng.randint(0, max(1, size.files // 50))}"
        length = int(rng.expovariate(1 / 6000)) + 1
        if index % 7 == 0:
            data = _binary(rng, length)
            name = f"blob{index}.bin"
        else:
            data = _text(rng, pool, length)
            name = f"file{index}.{rng.choice(['conf', 'log', 'rb', 'txt', 'yml'])}"
        _write(sub / name, data)
        written += len(data)
        if index % 97 == 0:
            link = sub / f"link{index}"
            if not link.exists():
                os.symlink(name, link)
    for index in range(size.large):
        data = _binary(rng, size.large_bytes) if index % 2 else _text(rng, pool, size.large_bytes)
        _write(root / ("var/lib" if rootfs else "uploads") / f"large{index}.dat", data)
        written += len(data)
    if rootfs:
        _write(root / "etc/hostname", f"{root.parent.name}\n".encode())
        _write(root / "run/app.pid", b"4242\n")
    return written
