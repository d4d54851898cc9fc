"""rsync's command line, exit-code table and output parsing, from recorded output."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from services.transfer.rsync import (
    EXIT_CODES,
    RsyncError,
    RsyncFailedError,
    RsyncOutput,
    classify,
    parse_progress,
    rsync_argv,
    ssh_command,
)
from shared.errors import HostKeyError, PermanentError, TransientError

# what rsync 3.x printed for a resumed 30 MB file with --stats --info=progress2
RECORDED = (
    b"\r              0   0%    0.00kB/s    0:00:00  \r     11,010,048  36%    9.77MB/s    "
    b"0:00:01  \r     30,000,000 100%   10.09MB/s    0:00:02 (xfr#1, to-chk=0/1)\n\n"
    b"Number of files: 1 (reg: 1)\nTotal file size: 30,000,000 bytes\n"
    b"Total transferred file size: 30,000,000 bytes\nLiteral data: 18,000,000 bytes\n"
    b"Matched data: 0 bytes\nTotal bytes sent: 18,004,475\nTotal bytes received: 35\n"
)


def test_command_resumes_a_sealed_archive_and_reports_progress() -> None:
    # Given an archive and a remote target, with a bandwidth limit
    argv = rsync_argv(Path("/staging/a.tar.zst"), "root@h:/d/m/a.tar.zst", ssh="ssh -p 2",
                      timeout_seconds=120, bwlimit_kbps=5000)
    # Then rsync appends to what arrived and verifies the whole file, and reports as it goes
    assert argv[:4] == ["setpriv", "--pdeathsig", "KILL", "rsync"]
    for option in ("--inplace", "--partial", "--append-verify", "--stats", "--info=progress2",
                   "--timeout=120", "--bwlimit=5000"):
        assert option in argv
    assert argv[-5:] == ["-e", "ssh -p 2", "--", "/staging/a.tar.zst", "root@h:/d/m/a.tar.zst"]


def test_command_to_a_local_directory_has_no_remote_shell_nor_limit() -> None:
    argv = rsync_argv(Path("/s/a"), "/d/m/a", ssh=None, timeout_seconds=5, bwlimit_kbps=None)
    assert "-e" not in argv and not any(a.startswith("--bwlimit") for a in argv)
    assert argv[-3:] == ["--", "/s/a", "/d/m/a"]


def test_ssh_command_trusts_only_the_configured_known_hosts() -> None:
    # Given key and known_hosts paths, one with a space
    line = ssh_command(key=Path("/keys/my key"), known_hosts=Path("/k/known_hosts"), port=2222,
                       connect_timeout=7)
    words = shlex.split(line)
    # Then unknown keys are refused, nothing prompts, and the paths survive rsync's splitting
    assert words[:3] == ["ssh", "-F", "none"]
    for option in ("IdentitiesOnly=yes", "BatchMode=yes", "StrictHostKeyChecking=yes",
                   "UserKnownHostsFile=/k/known_hosts", "GlobalKnownHostsFile=/dev/null"):
        assert option in words
    assert words[words.index("-i") + 1] == "/keys/my key"
    assert words[words.index("-p") + 1] == "2222"
    assert words[words.index("-c") + 1] == "aes128-gcm@openssh.com"


@pytest.mark.parametrize("code", [10, 11, 12, 23, 24, 30, 35, 255])
def test_connection_and_io_failures_are_retried(code: int) -> None:
    error = classify(code, "rsync: connection unexpectedly closed")
    assert isinstance(error, RsyncError) and error.exited == code
    assert f"rsync exit {code} ({EXIT_CODES[code].meaning})" in str(error)


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 6, 13, 14, 21, 22, 25, 127])
def test_usage_and_protocol_failures_are_permanent(code: int) -> None:
    error = classify(code, "rsync error")
    assert isinstance(error, RsyncFailedError) and isinstance(error, PermanentError)


def test_signals_and_undocumented_statuses_are_retried() -> None:
    assert "killed by signal 9" in str(classify(137, ""))
    assert isinstance(classify(99, ""), TransientError)


@pytest.mark.parametrize("stderr", [
    "Host key verification failed.\r\nrsync: connection unexpectedly closed",
    "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@",
    "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.",
])
def test_refused_host_key_is_permanent_even_with_exit_255(stderr: str) -> None:
    error = classify(255, stderr)
    assert isinstance(error, HostKeyError)
    assert "host key is unknown or changed" in str(error) and "nothing was sent" in str(error)


def test_progress_lines_give_bytes_rate_and_eta() -> None:
    line = "     11,010,048  36%    9.77MB/s    0:01:02  "
    progress = parse_progress(line)
    assert progress is not None
    assert progress.bytes_done == 11_010_048 and progress.percent == 36
    assert progress.mb_per_s == pytest.approx(9.77 * 1024 * 1024 / 1e6)
    assert progress.eta_s == 62.0
    final = parse_progress("     30,000,000 100%   10.09MB/s    0:00:02 (xfr#1, to-chk=0/1)")
    assert final is not None and final.eta_s is None  # elapsed time there, not an ETA
    assert parse_progress("Number of files: 1 (reg: 1)") is None


def test_output_streamed_in_odd_chunks_gives_progress_and_stats() -> None:
    # Given rsync's output cut at arbitrary places
    seen = []
    output = RsyncOutput(on_progress=seen.append)
    for start in range(0, len(RECORDED), 7):
        output.feed(RECORDED[start:start + 7])
    output.close()
    # Then every progress update and the stats are read
    assert [p.bytes_done for p in seen] == [0, 11_010_048, 30_000_000]
    assert output.stats == {"file_bytes": 30_000_000, "transferred_file_bytes": 30_000_000,
                            "literal_bytes": 18_000_000, "matched_bytes": 0,
                            "bytes_sent": 18_004_475}
