"""The sha256 at the destination: openssl where it is installed, else sha256sum."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from services.transfer.destination import parse_destination
from services.transfer.jobs import sha256_at
from shared.errors import PermanentError, TransientError
from shared.hosts import Result
from shared.settings import Settings

DIGEST = "5a" * 32


class RecordingHost:
    """A destination host whose commands answer from a table (a fake of the host layer)."""

    name = "fake"

    def __init__(self, answers: dict[str, tuple[int, bytes]]) -> None:
        self.answers = answers
        self.ran: list[list[str]] = []

    def run(self, argv: list[str], *, timeout: float | None = None, sink: object = None,
            ok_exits: Collection[int] = (0,), stdin: bytes | None = None) -> Result:
        self.ran.append(argv)
        exited, stdout = self.answers.get(argv[0], (127, b""))
        assert exited in ok_exits
        return Result(exited == 0, exited, stdout, "", argv, self.name)


REMOTE = parse_destination("root@h:/d", Settings())


def test_openssl_hashes_when_present() -> None:
    host = RecordingHost({"openssl": (0, f"{DIGEST} */d/m/a b\n".encode())})
    assert sha256_at(REMOTE, host, "/d/m/a b", 10, Settings()) == DIGEST  # type: ignore[arg-type]
    assert host.ran == [["openssl", "dgst", "-sha256", "-r", "--", "/d/m/a b"]]


def test_sha256sum_when_openssl_is_missing() -> None:
    host = RecordingHost({"sha256sum": (0, f"{DIGEST}  /d/m/a\n".encode())})
    assert sha256_at(REMOTE, host, "/d/m/a", 10, Settings()) == DIGEST  # type: ignore[arg-type]
    assert [argv[0] for argv in host.ran] == ["openssl", "sha256sum"]


def test_no_hasher_at_all_is_permanent() -> None:
    with pytest.raises(PermanentError, match="neither openssl nor sha256sum"):
        sha256_at(REMOTE, RecordingHost({}), "/d/m/a", 10, Settings())  # type: ignore[arg-type]


def test_output_that_is_not_a_digest_is_retried() -> None:
    host = RecordingHost({"openssl": (0, b"Segmentation fault\n")})
    with pytest.raises(TransientError, match="not a sha256"):
        sha256_at(REMOTE, host, "/d/m/a", 10, Settings())  # type: ignore[arg-type]
