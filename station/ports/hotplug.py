"""Port discovery: which serial ports exist now, and when they come and go.

A watchdog observer on the globs' directories is fast, but inotify can drop events and
cannot watch a directory that does not exist yet (``/dev/serial/by-path`` while nothing
is plugged). A periodic rescan is slow but never wrong for long; it also re-watches
directories that appeared or were replaced, and restarts a dead observer thread.

Neither source decides "added" or "removed": both only say "look at this path again",
and the loop thread compares what it finds with what it last reported. That makes
duplicates impossible when both see one change, and it turns a re-plug into removed +
added: a port *is* its identity (path, resolved device node, that node's dev/inode/rdev),
so a link that now points at another device node is another port, even if the name never
looked absent. A link re-created onto the same live node is not a re-plug (udev may
refresh links on "change" events; that must not cancel a flash).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import glob
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from serial.tools.list_ports_linux import SysFS
from watchdog import events as ev
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

log = logging.getLogger(__name__)

Identity = tuple[str, str, int, int, int]
"""(path, target, st_dev, st_ino, st_rdev) of the device node the path resolves to."""

STOP_TIMEOUT = 5.0  # seconds stop() waits for the observer thread
# Only these reach us: no IN_MODIFY, so bytes flowing through a watched /dev/ttyUSB0
# while flashing do not wake the observer. The watched directory's own deletion
# (IN_DELETE_SELF) always arrives, as a DirDeletedEvent.
_EVENTS = [ev.FileCreatedEvent, ev.FileMovedEvent, ev.FileDeletedEvent, ev.DirDeletedEvent]
# udev's by-path names: pci-0000:00:14.0-usb-0:1.2:1.0-port0 (newer udev: usbv2-0:...)
_BY_PATH_USB = re.compile(r"usb(?:v\d+)?-(\d+):([\d.]+):(\d+\.\d+)(?:-port(\d+))?$")


@dataclass(frozen=True)
class PortInfo:
    """One port as found. `path` is what the glob matched (a by-path link stays a link:
    that name is what the operator configured); `target` is the device node behind it."""

    path: str
    target: str
    location: str | None
    identity: Identity


def location_from_name(name: str) -> str | None:
    """The USB location in a by-path name, for devices sysfs says nothing about.

    ``pci-0000:00:14.0-usb-0:1.2:1.0-port0`` -> ``usb-0:1.2``; a non-first interface
    (``:1.1``) or port (``-port1``) is kept so each port of a multi-port bridge has its
    own slot. The PCI controller is dropped (one hub tree per station; short keys)."""
    m = _BY_PATH_USB.search(name)
    if m is None:
        return None
    bus, ports, interface, port = m.groups()
    location = f"usb-{bus}:{ports}"
    if interface != "1.0":
        location += f":{interface}"
    if port not in (None, "0"):
        location += f"-port{port}"
    return location


def usb_location(target: str, path: str) -> str | None:
    """The slot key: pyserial's location of the device node ("1-1.2", or "1-1.2:1.1" for
    one interface of a multi-interface bridge), else `location_from_name(path)`, else None.
    `SysFS` is what `comports()` builds per tty; asking for one spares reading them all."""
    try:
        location = SysFS(target).location
    except Exception:  # a device vanishing mid-read leaves sysfs half there
        location = None
    return location or location_from_name(os.path.basename(path))


def _identity(path: str, warned: set[str]) -> Identity | None:
    """The port's identity now, or None: missing, broken link, or not a character device
    (warned about once per path in `warned`: a typo'd glob should not spam the log)."""
    try:
        target = os.path.realpath(path)
        st = os.stat(target)
        again = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        if path not in warned:
            warned.add(path)
            log.warning("%s matches the port globs but is not a character device; ignored", path)
        return None
    if (st.st_dev, st.st_ino) != (again.st_dev, again.st_ino):
        return None  # the link changed while we looked; its own event brings us back
    return (path, target, st.st_dev, st.st_ino, st.st_rdev)


def _info(identity: Identity) -> PortInfo:
    path, target = identity[0], identity[1]
    return PortInfo(path, target, usb_location(target, path), identity)


def _glob(globs: Sequence[str]) -> set[str]:
    return {path for pattern in globs for path in glob.glob(pattern)}


def scan(globs: Sequence[str]) -> list[PortInfo]:
    """The ports present now, sorted by path (for `station ports` and `station check`)."""
    warned: set[str] = set()
    found = (_identity(path, warned) for path in sorted(_glob(globs)))
    return [_info(identity) for identity in found if identity is not None]


def _name_matches(name: str, pattern: str) -> bool:
    # Like glob: '*' does not match a leading dot. udev's temporary links are
    # '.#<name><random>', so they must not look like ports for the moment they exist.
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


class _Handler(ev.FileSystemEventHandler):
    """Runs in the observer thread: forwards names to the loop, nothing else."""

    def __init__(self, watcher: PortWatcher, directory: str, watch_path: str) -> None:
        self.watcher, self.directory, self.watch_path = watcher, directory, watch_path

    def on_any_event(self, event: ev.FileSystemEvent) -> None:
        paths = [os.fsdecode(event.src_path), os.fsdecode(event.dest_path)]
        names = [os.path.basename(p) for p in paths if p]
        lost = isinstance(event, ev.DirDeletedEvent) and paths[0] == self.watch_path
        self.watcher._from_thread(self.directory, names, lost)


_Watches = dict[str, tuple[ObservedWatch, tuple[int, int]]]  # dir -> (watch, dir's dev/ino)


class PortWatcher:
    """Reports ports matching `globs` as they appear and disappear, on the loop thread.

    Ports present at `start()` are reported as added; `stop()` forgets them without
    reporting removals. `watch_events=False` runs on the rescan alone (tests use it to
    prove the safety net; also for filesystems without inotify).
    """

    def __init__(
        self,
        globs: Sequence[str],
        rescan_interval: float,
        on_added: Callable[[PortInfo], None],
        on_removed: Callable[[PortInfo], None],
        *,
        watch_events: bool = True,
    ) -> None:
        self.globs = tuple(globs)
        self.rescan_interval = rescan_interval
        self._on_added, self._on_removed = on_added, on_removed
        self._watch_events = watch_events
        self._patterns: dict[str, list[str]] = {}  # directory as given -> name patterns
        for pattern in self.globs:
            directory, name = os.path.split(pattern)
            self._patterns.setdefault(directory, []).append(name)
        self._known: dict[str, PortInfo] = {}  # what was last reported, by path
        self._warned: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._watch_lock = asyncio.Lock()
        self._observer: BaseObserver | None = None
        self._watches: _Watches = {}
        self._failed: set[str] = set()  # directories whose watch failed (logged once)

    @property
    def ports(self) -> list[PortInfo]:
        """The ports reported as present, sorted by path."""
        return [self._known[path] for path in sorted(self._known)]

    @property
    def watching(self) -> frozenset[str]:
        """Directories with a live inotify watch right now (the rest rely on rescan)."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return frozenset()
        alive = {e.watch for e in list(observer.emitters) if e.is_alive()}
        return frozenset(d for d, (watch, _) in self._watches.items() if watch in alive)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("PortWatcher already started")
        self._loop = asyncio.get_running_loop()
        try:
            await self.rescan()  # watches first, then the listing: nothing falls between
        except BaseException:
            await self.stop()  # leave no observer thread behind
            raise
        self._task = asyncio.create_task(self._rescan_loop(), name="hotplug rescan")

    async def stop(self) -> None:
        """Stop watching; ports are not reported as removed. Joins the observer thread
        for at most STOP_TIMEOUT seconds (it is a daemon thread if it hangs)."""
        task, self._task, self._loop = self._task, None, None
        async with self._watch_lock:  # never stop the observer mid-(re)schedule
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            observer, self._observer, self._watches = self._observer, None, {}
        self._known.clear()
        if observer is not None:
            await _halt(observer)

    async def __aenter__(self) -> PortWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def rescan(self) -> None:
        """Re-establish lost watches, then compare every matching or known path with what
        was last reported. Runs every `rescan_interval`; a no-op unless started."""
        if self._watch_events:
            await self._maintain_watches()
        if self._loop is None:  # not started, or stop() came while we were waiting
            return
        for path in sorted(_glob(self.globs) | set(self._known)):
            self._reconcile(path)

    async def _rescan_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.rescan_interval)
            self._wake.clear()
            try:
                await self.rescan()
            except Exception:  # the safety net must outlive any one bad pass
                log.exception("port rescan failed; trying again in %.1f s", self.rescan_interval)

    def _reconcile(self, path: str) -> None:
        identity = _identity(path, self._warned)
        old = self._known.get(path)
        if old is not None and old.identity == identity:
            return
        if old is not None:
            del self._known[path]
            log.info("port removed: %s", path)
            self._call(self._on_removed, old)
        if identity is not None:
            info = self._known[path] = _info(identity)
            log.info("port added: %s -> %s (location %s)", path, info.target, info.location)
            self._call(self._on_added, info)

    @staticmethod
    def _call(callback: Callable[[PortInfo], None], info: PortInfo) -> None:
        try:
            callback(info)
        except Exception:  # a consumer's bug must not stop discovery of other ports
            log.exception("port callback %r failed for %s", callback, info.path)

    def _from_thread(self, directory: str, names: list[str], lost: bool) -> None:
        """Observer thread -> loop thread; the only method called off the loop."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed while we were stopping
            loop.call_soon_threadsafe(self._on_event, directory, names, lost)

    def _on_event(self, directory: str, names: list[str], lost: bool) -> None:
        if self._loop is None:  # stopped: late events from the observer thread
            return
        if lost:  # the directory went away: rescan now to drop the watch, retry later
            self._wake.set()
        for name in names:
            if any(_name_matches(name, p) for p in self._patterns.get(directory, ())):
                self._reconcile(os.path.join(directory, name))

    async def _maintain_watches(self) -> None:
        async with self._watch_lock:
            if self._loop is None:  # not started, or stopped: start no observer
                return
            if self._observer is None or not self._observer.is_alive():
                dead, self._observer, self._watches = self._observer, None, {}
                if dead is not None:
                    log.warning("file watcher thread died; restarting it (rescan covered)")
                    await _halt(dead)
                observer = Observer()
                try:
                    await asyncio.to_thread(observer.start)
                except Exception:
                    log.exception("cannot start the file watcher; relying on rescan")
                    return
                self._observer = observer
            self._watches = await asyncio.to_thread(
                self._refresh, self._observer, dict(self._watches)
            )

    def _refresh(self, observer: BaseObserver, watches: _Watches) -> _Watches:
        """In a worker thread (scheduling joins threads): watch each glob directory that
        exists; re-watch it if it was replaced or its emitter died. Returns the new map."""
        alive = {e.watch for e in list(observer.emitters) if e.is_alive()}
        result: _Watches = {}
        for directory in self._patterns:
            old = watches.get(directory)
            try:
                st = os.stat(directory or ".")
                key: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except OSError:
                key = None
            if old is not None and old[1] == key and old[0] in alive:
                result[directory] = old
                continue
            if old is not None:
                with contextlib.suppress(Exception):
                    observer.unschedule(old[0])
                log.info("watch on %s lost; rescanning it until it is back", directory)
            if key is None:
                continue
            real = os.path.realpath(directory or ".")
            try:
                watch = observer.schedule(
                    _Handler(self, directory, real), real, event_filter=_EVENTS
                )
            except OSError as e:
                level = logging.DEBUG if directory in self._failed else logging.WARNING
                self._failed.add(directory)
                log.log(level, "cannot watch %s (%s); relying on rescan", directory, e)
                continue
            self._failed.discard(directory)
            result[directory] = (watch, key)
            log.debug("watching %s", directory)
        return result


async def _halt(observer: BaseObserver) -> None:
    """Stop and join an observer off the loop, giving up after STOP_TIMEOUT. A thread of
    our own, not the executor: a hung join there would hang asyncio.run()'s shutdown."""

    def halt() -> None:
        try:
            observer.stop()
            if observer.is_alive():
                observer.join(STOP_TIMEOUT)
        except Exception:
            log.exception("stopping the file watcher failed")

    thread = threading.Thread(target=halt, name="hotplug-stop", daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, STOP_TIMEOUT)
    if thread.is_alive():
        log.warning("file watcher did not stop within %.0f s; leaving it", STOP_TIMEOUT)
