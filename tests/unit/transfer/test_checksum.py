"""The sha256 at the destination: openssl where it is installed, else sha256sum.

The real hashers run through the host layer's local executor; which of them is "installed"
is decided by the PATH it runs them with.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from services.transfer.destination import parse_destination
from services.transfer.jobs import sha256_at
from shared.errors import PermanentError, TransientError
from shared.hosts import LocalExecutor
from shared.settings import Settings

REMOTE = parse_destination("root@h:/d", Settings())


def archive(tmp_path: Path) -> tuple[Path, str]:
    """A file whose name a shell would split, and its sha256."""
    path = tmp_path / "a b.tar.zst"
    path.write_bytes(os.urandom(4096))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *tools: str) -> Path:
    """A PATH holding bash (the host layer needs it) and `tools` only."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for tool in ("bash", *tools):
        found = shutil.which(tool)
        assert found is not None, f"{tool} is not installed on this machine"
        (directory / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(directory))
    return directory


def test_openssl_hashes_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, digest = archive(tmp_path)
    only(tmp_path, monkeypatch, "openssl")  # no sha256sum to fall back on
    assert sha256_at(REMOTE, LocalExecutor(), str(path), 4096, Settings()) == digest


def test_sha256sum_when_openssl_is_missing(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path, digest = archive(tmp_path)
    only(tmp_path, monkeypatch, "sha256sum")
    assert sha256_at(REMOTE, LocalExecutor(), str(path), 4096, Settings()) == digest


def test_no_hasher_at_all_is_permanent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = archive(tmp_path)
    only(tmp_path, monkeypatch)
    with pytest.raises(PermanentError, match="neither openssl nor sha256sum"):
        sha256_at(REMOTE, LocalExecutor(), str(path), 4096, Settings())


def test_output_that_is_not_a_digest_is_retried(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = archive(tmp_path)
    broken = only(tmp_path, monkeypatch) / "openssl"
    broken.write_text(f"#!{broken.parent / 'bash'}\necho 'Segmentation fault'\n")
    broken.chmod(0o755)
    with pytest.raises(TransientError, match="not a sha256"):
        sha256_at(REMOTE, LocalExecutor(), str(path), 4096, Settings())
