"""The snapshotter's rules that need no host: requests, release decisions, status parsing,
and the exact dmsetup sequence of a create (against a recording host)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from services.snapshotter.devicemapper import check_device, snapshot_id_of, snapshot_usage
from services.snapshotter.drivers import DmDriver, SnapshotSpec, driver_for
from services.snapshotter.exports import render_config
from services.snapshotter.handlers import release_reason, request_problem
from shared.contracts import ArchiveCompleted, ArchiveFailed, ArchiveSource, SnapshotRequested
from shared.errors import PermanentError, UnexpectedExit
from shared.hosts import Result, Sink


def requested(**overrides: object) -> SnapshotRequested:
    values: dict[str, object] = {
        "request_id": "r1", "datacenter": "ey04", "xen_host": "root@xen1:22",
        "device": "/dev/vg0/vm1-root", "size_bytes": 0, "driver": "dm", "reuse_key": "k",
        "source": ArchiveSource(host="xen1")}
    values.update(overrides)
    return SnapshotRequested(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("overrides, problem", [
    ({}, None),
    ({"device": "--help"}, "not a device path"),
    ({"device": "/dev/../etc/passwd"}, "not a device path"),
    ({"xen_host": "root@xen1;reboot"}, "not a host address"),
    ({"driver": "none", "device": ""}, "driver none needs"),
    ({"driver": "none", "device": "", "source": ArchiveSource(host="x", path="/srv")}, None),
])
def test_a_bad_request_is_refused_with_what_is_wrong(overrides: dict[str, object],
                                                      problem: str | None) -> None:
    found = request_problem(requested(**overrides))
    assert (found is None) if problem is None else (problem in (found or ""))


def job(**values: object) -> SimpleNamespace:
    return SimpleNamespace(**{"state": "active", "snapshot_id": "ferry-0123456789ab-2", **values})


def archive_failed(**values: object) -> ArchiveFailed:
    return ArchiveFailed(**{"datacenter": "ey04", "request_id": "r1", "kind": "local_fs",
                            "reason": "tar: read error", **values})  # type: ignore[arg-type]


def archive_completed(**values: object) -> ArchiveCompleted:
    now = datetime.now(UTC)
    return ArchiveCompleted(**{
        "datacenter": "ey04", "request_id": "r1", "archive_id": "a", "kind": "local_fs",
        "reuse_key": "k", "path": "/x", "file_name": "x", "raw_bytes": 1, "compressed_bytes": 1,
        "sha256": "0" * 64, "started_at": now, "finished_at": now, **values})  # type: ignore[arg-type]


def test_an_archive_end_releases_only_the_current_active_snapshot() -> None:
    assert release_reason(job(), archive_completed()) == "archive completed"
    assert release_reason(job(), archive_failed()) == "archive failed: tar: read error"
    # an earlier attempt's event, a retried archive, a snapshot not active: left alone
    assert release_reason(job(), archive_failed(snapshot_id="ferry-0123456789ab-1")) is None
    assert release_reason(job(), archive_failed(will_retry=True)) is None
    assert release_reason(job(state="pending"), archive_completed()) is None


def test_snapshot_status_lines_say_valid_used_and_total() -> None:
    assert snapshot_usage("0 262144 snapshot 1112/16384 16") == (True, 1112, 16384)
    assert snapshot_usage("0 262144 snapshot Invalid") == (False, 0, 0)
    assert snapshot_usage("0 262144 snapshot Overflow") == (False, 0, 0)


def test_names_and_paths() -> None:
    assert snapshot_id_of("ferry-0123456789ab-3-real") == "ferry-0123456789ab-3"
    assert snapshot_id_of("vg0-vm1--root") is None
    assert check_device("/dev/mapper/vg0-vm1") == "/dev/mapper/vg0-vm1"
    with pytest.raises(PermanentError):
        driver_for("zfs", None, "/x")


def test_nbd_config_listens_on_loopback_in_generic_and_exports_read_only() -> None:
    text = render_config("ferry-0123456789ab-1", "/dev/mapper/ferry-0123456789ab-1-snap", 10900)
    generic, export = text.split("[ferry-0123456789ab-1]")
    assert "listenaddr = 127.0.0.1" in generic and "port = 10900" in generic
    assert "readonly = true" in export and "exportname = /dev/mapper/" in export


class RecordingHost:
    """Answers dmsetup like a host with one linear origin; fails the command named `fail`."""

    name = "xen1"

    def __init__(self, fail: str = "") -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.suspended = False

    def run(self, argv: list[str], *, timeout: float | None = None, sink: Sink | None = None,
            ok_exits: Collection[int] = (0,), stdin: bytes | None = None) -> Result:
        self.calls.append(argv)
        if " ".join(argv[:3]) == self.fail:
            raise UnexpectedExit(self.name, argv, 1, "injected")
        out = b""
        if argv[:2] == ["dmsetup", "suspend"]:
            self.suspended = True
        elif argv[:2] == ["dmsetup", "resume"]:
            self.suspended = False
        elif argv[:2] == ["dmsetup", "table"] and len(argv) == 3:
            out = b"0 2048 linear 254:0 0\n"
        elif argv[:2] == ["dmsetup", "info"] and argv[-1] == "/dev/vg0/vm1":
            out = b"vg0-vm1\n"
        elif argv[:2] == ["dmsetup", "info"] and "attr" in argv:
            out = b"L-sw\n" if self.suspended else b"L--w\n"
        elif argv[0] == "blockdev":
            out = b"2048\n"
        elif argv[0] == "losetup" and "--show" in argv:
            out = b"/dev/loop3\n"
        return Result(True, 0, out, "", argv, self.name)

    def run_pipeline(self, stages: list[list[str]], **_: object) -> Result:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


def test_dm_create_runs_lvcreate_snapshot_steps_in_order() -> None:
    host = RecordingHost()
    snap = DmDriver(None, "/var/lib/ferry/cow").create(
        host, SnapshotSpec("ferry-0123456789ab-1", "/dev/vg0/vm1", 3 << 20))
    dm_steps = [c[1:3] for c in host.calls if c[0] == "dmsetup" and c[1] in
                ("create", "suspend", "load", "resume")]
    assert dm_steps == [["create", "ferry-0123456789ab-1-real"], ["suspend", "vg0-vm1"],
                        ["create", "ferry-0123456789ab-1-snap"], ["load", "vg0-vm1"],
                        ["resume", "vg0-vm1"]]
    assert snap.export_device == "/dev/mapper/ferry-0123456789ab-1-snap"
    assert snap.size_bytes == 2048 * 512 and snap.cow_bytes == 3 << 20


def test_dm_create_failing_after_the_suspend_resumes_the_origin() -> None:
    host = RecordingHost(fail="dmsetup load vg0-vm1")
    with pytest.raises(UnexpectedExit):
        DmDriver(None, "/var/lib/ferry/cow").create(
            host, SnapshotSpec("ferry-0123456789ab-1", "/dev/vg0/vm1", 3 << 20))
    assert not host.suspended
    assert ["dmsetup", "clear", "vg0-vm1"] in host.calls  # the half-loaded table is dropped
