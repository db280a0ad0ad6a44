"""Port discovery against real files, symlinks, ptys and a real watchdog observer.

A pty slave (/dev/pts/N) is a real character device that exists while its master fd is
open, so it stands in for /dev/ttyUSBn. Ports are plugged the way udev does it: a
symlink under a temporary dot-name, renamed into place in a by-path style directory.

Tests that must prove the inotify path use a 60 s rescan interval, so nothing but an
event can deliver within the 5 s wait; tests of the safety net use 0.1 s. "Exactly once"
is checked by forcing a full rescan after the expected callbacks (`PortWatcher.rescan`)
and requiring that nothing more arrived, and by the full log at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from station.ports import PortInfo, PortWatcher, scan
from station.ports.hotplug import location_from_name, usb_location

WAIT = 5.0
EVENTS_ONLY = 60.0  # rescan interval that cannot fire within a test: inotify must deliver
FAST = 0.1


def name(i: int) -> str:
    return f"pci-0000:00:14.0-usb-0:1.{i}:1.0-port0"


class Ptys:
    """Real pseudo-terminals, all kept open until the test ends (so pts numbers, and
    with them device identities, are never reused within a test)."""

    def __init__(self) -> None:
        self.masters: list[int] = []

    def new(self) -> str:
        master, slave = os.openpty()
        self.masters.append(master)
        path = os.ttyname(slave)
        os.close(slave)
        return path

    def close(self) -> None:
        for fd in self.masters:
            os.close(fd)


@pytest.fixture
def ptys() -> Iterator[Ptys]:
    p = Ptys()
    yield p
    p.close()


def plug(directory: Path, link: str, target: str) -> Path:
    """As udev does: create the link under a temporary dot-name, rename it into place."""
    tmp = directory / f".#{link}.tmp"
    os.symlink(target, tmp)
    path = directory / link
    os.rename(tmp, path)
    return path


class Recorder:
    """Collects callbacks in order; checks they run on the loop's thread."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, PortInfo]] = asyncio.Queue()
        self.log: list[tuple[str, str, str]] = []
        self.thread = threading.get_ident()

    def added(self, info: PortInfo) -> None:
        self._put("added", info)

    def removed(self, info: PortInfo) -> None:
        self._put("removed", info)

    def _put(self, kind: str, info: PortInfo) -> None:
        assert threading.get_ident() == self.thread, "callback off the loop thread"
        self.log.append((kind, info.path, info.target))
        self.queue.put_nowait((kind, info))

    async def expect(self, n: int) -> list[tuple[str, PortInfo]]:
        return [await asyncio.wait_for(self.queue.get(), WAIT) for _ in range(n)]

    async def quiet(self, watcher: PortWatcher) -> None:
        """A full rescan reports nothing new: no duplicate is pending."""
        await watcher.rescan()
        assert self.queue.empty(), f"unexpected: {self.queue.get_nowait()}"


def run(test: Callable[[Recorder], Awaitable[None]]) -> Recorder:
    """pytest-asyncio is not used: each test is one asyncio.run()."""

    async def main() -> Recorder:
        rec = Recorder()
        await test(rec)
        return rec

    return asyncio.run(main())


def watcher(globs: list[Path], interval: float, rec: Recorder, **kw: Any) -> PortWatcher:
    return PortWatcher([str(g) for g in globs], interval, rec.added, rec.removed, **kw)


def test_location_from_by_path_names() -> None:
    assert location_from_name("pci-0000:00:14.0-usb-0:1.2:1.0-port0") == "usb-0:1.2"
    assert location_from_name("pci-0000:00:14.0-usbv2-0:1.4.3:1.0") == "usb-0:1.4.3"
    assert location_from_name("pci-0000:00:14.0-usb-0:1.2:1.1-port0") == "usb-0:1.2:1.1"
    assert location_from_name("pci-0000:00:14.0-usb-0:1.2:1.0-port1") == "usb-0:1.2-port1"
    assert location_from_name("usb-Silicon_Labs_CP2102_0001-if00-port0") is None
    assert location_from_name("ttyUSB0") is None


def test_scan_lists_character_devices_by_their_link(
    tmp_path: Path, ptys: Ptys, caplog: pytest.LogCaptureFixture
) -> None:
    pty = ptys.new()
    plug(tmp_path, name(2), pty)
    os.symlink(ptys.new(), tmp_path / f".#{name(3)}")  # udev's temp link: never a port
    os.symlink(tmp_path / "gone", tmp_path / name(4))  # broken link: absent
    (tmp_path / name(5)).write_text("not a tty")  # regular file: ignored, with a warning
    ports = scan([str(tmp_path / "*")])
    assert [(p.path, p.target, p.location) for p in ports] == [
        (str(tmp_path / name(2)), pty, "usb-0:1.2")
    ]
    assert ports[0].identity[:2] == (str(tmp_path / name(2)), pty)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name(5) in warnings[0].getMessage()


def test_location_of_a_device_without_usb_sysfs_comes_from_the_name(ptys: Ptys) -> None:
    pty = ptys.new()
    assert usb_location(pty, f"/dev/serial/by-path/{name(7)}") == "usb-0:1.7"
    assert usb_location(pty, pty) is None


def test_ports_present_at_start_are_added_once(tmp_path: Path, ptys: Ptys) -> None:
    plug(tmp_path, name(1), ptys.new())

    async def test(rec: Recorder) -> None:
        async with watcher([tmp_path / "pci-*"], FAST, rec) as w:
            [(kind, info)] = await rec.expect(1)
            assert (kind, info.path) == ("added", str(tmp_path / name(1)))
            assert w.ports == [info]
            await rec.quiet(w)

    assert len(run(test).log) == 1


def test_inotify_sees_create_move_into_and_delete(tmp_path: Path, ptys: Ptys) -> None:
    a, b = ptys.new(), ptys.new()
    link = tmp_path / name(1)

    async def test(rec: Recorder) -> None:
        async with watcher([tmp_path / "*"], EVENTS_ONLY, rec) as w:
            assert w.watching == {str(tmp_path)}
            os.symlink(b, tmp_path / ".#stray")  # a dot-name even though the glob is '*'
            os.symlink(a, link)  # create
            [(kind, info)] = await rec.expect(1)
            assert (kind, info.path, info.target) == ("added", str(link), a)
            os.unlink(link)  # delete
            [(kind, gone)] = await rec.expect(1)
            assert (kind, gone) == ("removed", info)
            plug(tmp_path, name(1), a)  # move-into
            [(kind, info)] = await rec.expect(1)
            assert (kind, info.path, info.location) == ("added", str(link), "usb-0:1.1")
            os.rename(link, tmp_path / ".old")  # moved to a dot-name: unplugged
            [(kind, _)] = await rec.expect(1)
            assert kind == "removed"
            await rec.quiet(w)

    rec = run(test)
    assert [k for k, _, _ in rec.log] == ["added", "removed", "added", "removed"]


def test_replug_under_the_same_name_is_removed_then_added(tmp_path: Path, ptys: Ptys) -> None:
    a, b, c = ptys.new(), ptys.new(), ptys.new()
    link = str(tmp_path / name(1))

    async def test(rec: Recorder) -> None:
        async with watcher([tmp_path / "pci-*"], EVENTS_ONLY, rec) as w:
            plug(tmp_path, name(1), a)
            await rec.expect(1)
            # Coalesced: the rename replaces the link atomically; the name never looks absent.
            plug(tmp_path, name(1), b)
            events = await rec.expect(2)
            assert [(k, i.path, i.target) for k, i in events] == [
                ("removed", link, a),
                ("added", link, b),
            ]
            # Unplug and plug back quickly, before anything could look.
            os.unlink(link)
            plug(tmp_path, name(1), c)
            events = await rec.expect(2)
            assert [(k, i.target) for k, i in events] == [("removed", b), ("added", c)]
            await rec.quiet(w)

    assert len(run(test).log) == 5


def test_rescan_alone_catches_every_change(tmp_path: Path, ptys: Ptys) -> None:
    a, b = ptys.new(), ptys.new()
    link = str(tmp_path / name(1))

    async def test(rec: Recorder) -> None:
        async with watcher([tmp_path / "pci-*"], FAST, rec, watch_events=False) as w:
            assert w.watching == frozenset()
            plug(tmp_path, name(1), a)
            [(kind, _)] = await rec.expect(1)
            assert kind == "added"
            plug(tmp_path, name(1), b)
            events = await rec.expect(2)
            assert [(k, i.target) for k, i in events] == [("removed", a), ("added", b)]
            os.unlink(link)
            [(kind, info)] = await rec.expect(1)
            assert (kind, info.target) == ("removed", b)
            await rec.quiet(w)

    assert len(run(test).log) == 4


def test_sixteen_ports_at_once_with_both_sources(tmp_path: Path, ptys: Ptys) -> None:
    targets = [ptys.new() for _ in range(16)]

    async def test(rec: Recorder) -> None:
        async with watcher([tmp_path / "pci-*"], FAST, rec) as w:
            for i, target in enumerate(targets):
                plug(tmp_path, name(i), target)
            added = await rec.expect(16)
            assert {k for k, _ in added} == {"added"}
            assert sorted(i.target for _, i in added) == sorted(targets)
            assert len({i.location for _, i in added}) == 16
            await rec.quiet(w)
            for i in range(16):
                os.unlink(tmp_path / name(i))
            removed = await rec.expect(16)
            assert {k for k, _ in removed} == {"removed"}
            assert len({i.path for _, i in removed}) == 16
            await rec.quiet(w)
            assert w.ports == []

    assert len(run(test).log) == 32


def test_directory_that_appears_later_is_watched_and_rewatched(tmp_path: Path, ptys: Ptys) -> None:
    by_path = tmp_path / "serial" / "by-path"
    a, b = ptys.new(), ptys.new()

    async def test(rec: Recorder) -> None:
        async with watcher([by_path / "*"], FAST, rec) as w:
            assert w.watching == frozenset()
            by_path.mkdir(parents=True)  # udev creates it with the first board
            plug(by_path, name(1), a)
            [(kind, info)] = await rec.expect(1)
            assert (kind, info.target) == ("added", a)
            await w.rescan()
            assert w.watching == {str(by_path)}
            os.unlink(by_path / name(1))  # the last board goes, and so does the directory
            by_path.rmdir()
            [(kind, _)] = await rec.expect(1)
            assert kind == "removed"
            await w.rescan()
            assert w.watching == frozenset()
            by_path.mkdir()  # a new directory (new inode): watched afresh
            plug(by_path, name(2), b)
            [(kind, info)] = await rec.expect(1)
            assert (kind, info.target) == ("added", b)
            await rec.quiet(w)
            assert w.watching == {str(by_path)}

    assert len(run(test).log) == 3


def test_regular_file_matching_the_glob_is_ignored_with_one_warning(
    tmp_path: Path, ptys: Ptys, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(rec: Recorder) -> None:
        async with watcher([tmp_path / "ttyUSB*"], FAST, rec) as w:
            (tmp_path / "ttyUSB9").write_text("a log file, not a tty")
            os.symlink(ptys.new(), tmp_path / "ttyUSB0")
            [(kind, info)] = await rec.expect(1)  # the file was seen first (same watch)
            assert (kind, info.path) == ("added", str(tmp_path / "ttyUSB0"))
            await rec.quiet(w)
            await rec.quiet(w)

    assert len(run(test).log) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{tmp_path / 'ttyUSB9'} matches the port globs but is not a character device; ignored"
    ]


def test_dead_observer_is_covered_by_rescan_and_restarted(
    tmp_path: Path, ptys: Ptys, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(rec: Recorder) -> None:
        async with watcher([tmp_path / "pci-*"], FAST, rec) as w:
            assert w.watching == {str(tmp_path)}
            dead = w._observer  # white-box: kill the thread as a crash would
            assert dead is not None
            await asyncio.to_thread(dead.stop)
            plug(tmp_path, name(1), ptys.new())
            [(kind, _)] = await rec.expect(1)
            assert kind == "added"
            await rec.quiet(w)
            assert w.watching == {str(tmp_path)}
            assert w._observer is not dead

    run(test)
    assert any("restarting" in r.getMessage() for r in caplog.records)


def test_failing_callback_does_not_stop_discovery(tmp_path: Path, ptys: Ptys) -> None:
    async def test(rec: Recorder) -> None:
        def explode(info: PortInfo) -> None:
            rec.added(info)
            raise RuntimeError("consumer bug")

        w = PortWatcher([str(tmp_path / "pci-*")], FAST, explode, rec.removed)
        async with w:
            plug(tmp_path, name(1), ptys.new())
            plug(tmp_path, name(2), ptys.new())
            events = await rec.expect(2)
            assert sorted(i.path for _, i in events) == [
                str(tmp_path / name(1)),
                str(tmp_path / name(2)),
            ]
            await rec.quiet(w)

    run(test)


def test_stop_joins_the_observer_and_ignores_later_changes(tmp_path: Path, ptys: Ptys) -> None:
    async def test(rec: Recorder) -> None:
        w = watcher([tmp_path / "pci-*"], FAST, rec)
        await w.start()
        observer = w._observer
        assert observer is not None and observer.is_alive()
        await w.stop()
        assert not observer.is_alive()
        assert w.watching == frozenset()
        plug(tmp_path, name(1), ptys.new())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rec.queue.get(), 3 * FAST)

    assert run(test).log == []
