"""Remote ports: boards on hub hosts, reached as `rfc2217://host:port` (RFC 2217).

The daemon must not tell a remote port from a plugged one, so this module reports the
same "port added / removed" (`PortInfo`, the URL as path, target and slot key) as
hotplug.py. What "plugged" means differs, and that forced the design:

- A remote port is *present* while its TCP endpoint accepts. A hub relay
  (esptool's esp_rfc2217_server, ser2net) serves one client at a time, so presence is
  probed with a bare TCP connect that is closed at once, and only while no job holds it.
- From the job's start the flasher holds the RFC 2217 connection, and after the job it
  hands it over here (`keep`) instead of closing it: a relay that loses its client drops
  DTR and RTS one after the other (esp_rfc2217_server does `dtr = False; rts = False`),
  which on the devkit's auto-reset circuit is an EN pulse: a done board would reboot, and
  a reopen would reset it again. So a done board's connection stays open until the far
  end closes it (board unplugged at the hub host, relay stopped): that is "removed".
- An unreachable hub host is retried with exponential backoff on its own task; it is
  reported (`HubStatus`, for the dashboard and `station ports`) and never waits on,
  or blocks, local ports or other hubs.

- A job that ends with no connection to keep (esptool closes the port itself after a
  failed connect: a mute board, one whose BOOT + EN nobody pressed) would leave nothing
  for the far end to close, and the operator's replacement board at that hub port would
  never be seen. So a job's end (`JobFinished`, this object is a bus observer) with no
  kept connection starts a *watcher*: a bare TCP connection (no telnet answer, so no
  DTR/RTS change can reset anything) that only reads, until the far end closes it.
  A relay still busy with our last client turns the watcher away before its greeting
  (its first telnet bytes); that is retried, never taken for an unplug.

Connections die in one of four places, all of which end in `lost(url)`: the keeper's
read (after a job), the watcher's (after a job that kept nothing), the flasher's serial
error mid-job (a hub host dropping mid-flash ends that board `removed`), or the probe
failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from station.events import Event, HubStatus, JobFinished
from station.ports.hotplug import PortInfo
from station.ports.remoteurl import host_port

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0  # seconds for a TCP connect to a hub host on the line's own network
BACKOFF_FIRST = 0.5  # seconds before the first retry of an unreachable hub
BACKOFF_MAX = 30.0  # the longest wait between retries: a hub host back is seen within it
KEEP_READ_TIMEOUT = 0.5  # the keeper's read timeout: how fast stop() ends its thread
WATCH_RETRY_MAX = 2.0  # the longest pause before a turned-away watcher connects again


@dataclass
class _Remote:
    url: str
    generation: int = 0  # a port back after a loss is another port (as a re-plug)
    state: str = "probing"  # probing | present | down
    detail: str = ""
    held: Any = None  # the kept serial connection, after a job
    keeper: threading.Thread | None = None
    info: PortInfo | None = None
    gone: asyncio.Event | None = None
    watch: threading.Event | None = None  # while a watcher holds the URL (observe): its stop
    watcher: threading.Thread | None = None


def _info(url: str, generation: int) -> PortInfo:
    return PortInfo(path=url, target=url, location=url,
                    identity=(url, url, 0, 0, generation))


def _link_alive(port: Any) -> bool:
    """pyserial's RFC 2217 client keeps its reader thread exactly as long as the socket
    lives (`rfc2217.Serial._telnet_read_loop` ends on EOF or a socket error); its reads
    then raise "connection failed (reader thread died)". No public flag says so."""
    thread = getattr(port, "_thread", None)
    return bool(getattr(port, "is_open", False)) and thread is not None and thread.is_alive()


def _far_end_closed(port: Any) -> bool:
    """The hub ended the connection, as opposed to our side closing it: esptool closes
    the port after a failed connect (a mute board), which says nothing about the hub
    (serial.RemotePort notes which it was)."""
    if getattr(port, "far_end_closed", False):
        return True
    return bool(getattr(port, "is_open", False)) and not _link_alive(port)


class RemotePorts:
    """Reports `urls` as present / gone, like `hotplug.PortWatcher` reports device nodes.

    `keep(url, port)` and `lost(url)` are the flasher's side (station/flash/session.py takes
    this object as its `links`); both may be called from any thread."""

    def __init__(self, urls: Sequence[str], *, show: Callable[[Event], None] = lambda _e: None,
                 slot_for: Callable[[str], str] = lambda url: url,
                 probe_timeout: float = PROBE_TIMEOUT, backoff_max: float = BACKOFF_MAX) -> None:
        self.urls = tuple(urls)
        self._remotes = {url: _Remote(url) for url in self.urls}
        self._show, self._slot_for = show, slot_for
        self.probe_timeout, self.backoff_max = probe_timeout, backoff_max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._on_added: Callable[[PortInfo], None] = lambda _i: None
        self._on_removed: Callable[[PortInfo], None] = lambda _i: None
        self._lock = threading.Lock()

    # -- what the daemon and the CLI ask --

    @property
    def ports(self) -> list[PortInfo]:
        return [r.info for r in self._remotes.values() if r.info is not None]

    def present(self, url: str) -> bool:
        remote = self._remotes.get(url)
        return remote is not None and remote.info is not None

    def status(self) -> list[tuple[str, str, str]]:
        """(url, state, detail) per remote port, in config order."""
        return [(r.url, r.state, r.detail) for r in self._remotes.values()]

    # -- life --

    async def start(self, on_added: Callable[[PortInfo], None],
                    on_removed: Callable[[PortInfo], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_added, self._on_removed = on_added, on_removed
        for remote in self._remotes.values():
            remote.gone = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._follow(remote),
                                                   name=f"remote {remote.url}"))

    async def stop(self) -> None:
        """Stop probing; kept connections are closed (the process is ending anyway)."""
        tasks, self._tasks, self._loop = self._tasks, [], None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for remote in self._remotes.values():
            if remote.watch is not None:
                await asyncio.to_thread(self._unwatch, remote)  # it joins the watcher
            held, remote.held, remote.info = remote.held, None, None
            if held is not None:
                await asyncio.to_thread(_close, held)

    # -- the flasher's side (any thread) --

    def keep(self, url: str, port: Any) -> None:
        """Hold `port` (an open RFC 2217 connection, after its job) until the far end
        closes it; reading it also drains the board's console so the relay never stalls."""
        remote = self._remotes.get(url)
        if remote is None or self._loop is None:
            _close(port)
            return
        with self._lock:
            remote.held = port
            remote.keeper = threading.Thread(target=self._keeper, args=(remote, port),
                                             daemon=True, name=f"keep {url}")
            remote.keeper.start()

    def take(self, url: str) -> Any | None:
        """The kept connection to `url` for a new session (a retry), or None. Blocks
        until the keeper stopped reading it (at most its read timeout): two readers on
        one connection would each lose the other's bytes."""
        remote = self._remotes.get(url)
        if remote is None:
            return None
        self._unwatch(remote)  # the relay serves one client: the session's, from now on
        with self._lock:
            port, keeper, remote.held, remote.keeper = remote.held, remote.keeper, None, None
        if keeper is not None:
            keeper.join(KEEP_READ_TIMEOUT * 4)
        return port if port is not None and _link_alive(port) else None

    def lost(self, url: str) -> None:
        """The connection to `url` died (a serial error on it, or the keeper's EOF)."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._gone, url)

    def link_failed(self, url: str, port: Any) -> bool:
        """After a serial error on `port` to `url`: is the connection dead? Then the port
        is gone (reported here, before the caller's error reaches the worker)."""
        if not _far_end_closed(port):
            return False
        self.lost(url)
        remote = self._remotes.get(url)
        if remote is not None:
            remote.info = None  # `present` says no at once; the loop reports the removal
        return True

    def observe(self, event: Event) -> None:
        """Bus observer: a job on a remote port ended. If its session kept no connection
        (a failed connect: esptool closed the port), watch the URL for the unplug."""
        if not isinstance(event, JobFinished):
            return
        remote = self._remotes.get(event.port)
        if remote is None or remote.info is None or self._loop is None:
            return  # not ours, or already gone (the job ended `removed`)
        with self._lock:
            if remote.held is not None or remote.watch is not None:
                return  # the keeper watches it
            stop = remote.watch = threading.Event()
            remote.watcher = threading.Thread(target=self._watcher,
                                              args=(remote, stop, remote.generation),
                                              daemon=True, name=f"watch {remote.url}")
            remote.watcher.start()

    # -- inside --

    def _unwatch(self, remote: _Remote) -> None:
        """End the watcher, its socket closed when this returns (bounded): the relay
        serves one client, and the caller may be about to become it."""
        with self._lock:
            stop, thread, remote.watch, remote.watcher = remote.watch, remote.watcher, None, \
                None
        if stop is not None:
            stop.set()  # the watcher closes its socket within KEEP_READ_TIMEOUT
        if thread is not None and thread is not threading.current_thread():
            thread.join(KEEP_READ_TIMEOUT * 4)

    def _watcher(self, remote: _Remote, stop: threading.Event, generation: int) -> None:
        """Hold a bare TCP connection to the URL and read until the far end closes it."""
        address = host_port(remote.url)
        pause = KEEP_READ_TIMEOUT
        while not stop.is_set():
            try:
                sock = socket.create_connection(address, timeout=self.probe_timeout)
            except OSError as e:  # refused, timed out: the board (or its hub) is gone
                log.info("%s: cannot watch the port (%s)", remote.url, e.strerror or e)
                break
            greeted = False
            with sock:
                sock.settimeout(KEEP_READ_TIMEOUT)
                while not stop.is_set():
                    try:
                        data = sock.recv(4096)
                    except TimeoutError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        break
                    greeted = True  # the relay serves us: its telnet requests, the console
            if greeted or stop.is_set():
                break
            # turned away before a word: the relay's one client was still our last one
            stop.wait(pause)
            pause = min(pause * 2, WATCH_RETRY_MAX)
        with self._lock:
            mine = remote.watch is stop
            if mine:
                remote.watch = remote.watcher = None
        if mine and not stop.is_set() and remote.generation == generation:
            log.info("%s: the hub closed the connection (board unplugged there?)", remote.url)
            self.lost(remote.url)


    def _keeper(self, remote: _Remote, port: Any) -> None:
        with contextlib.suppress(Exception):
            port.timeout = KEEP_READ_TIMEOUT
        while remote.held is port:
            try:
                port.read(4096)
            except Exception:  # EOF, socket error, closed: all mean the far end is gone
                break
        with self._lock:
            mine = remote.held is port
            if mine:
                remote.held = remote.keeper = None
        if mine:  # else a new session took it over: not ours to close
            _close(port)
            log.info("%s: the hub closed the connection (board unplugged there?)", remote.url)
            self.lost(remote.url)

    def _gone(self, url: str) -> None:
        remote = self._remotes[url]
        if remote.gone is not None:
            remote.gone.set()

    async def _follow(self, remote: _Remote) -> None:
        host, tcp_port = host_port(remote.url)
        delay = BACKOFF_FIRST
        assert remote.gone is not None
        while True:
            error = await self._probe(host, tcp_port)
            if error is not None:
                self._set(remote, "down", f"{error}; retry in {delay:g} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            delay = BACKOFF_FIRST
            remote.gone.clear()
            remote.generation += 1
            info = remote.info = _info(remote.url, remote.generation)
            self._set(remote, "present", "")
            log.info("port added: %s (remote)", remote.url)
            self._call(self._on_added, info)
            await remote.gone.wait()
            remote.info = None
            self._set(remote, "probing", "connection closed")
            log.info("port removed: %s (remote)", remote.url)
            self._call(self._on_removed, info)

    async def _probe(self, host: str, port: int) -> str | None:
        """None if the hub accepts a TCP connection, else why not (one line)."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                               self.probe_timeout)
        except TimeoutError:
            return f"no answer from {host}:{port} within {self.probe_timeout:g} s"
        except OSError as e:
            return f"{host}:{port}: {e.strerror or e}"
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), self.probe_timeout)
        return None

    def _set(self, remote: _Remote, state: str, detail: str) -> None:
        changed = (remote.state, remote.detail.split(";")[0]) != (state, detail.split(";")[0])
        remote.state, remote.detail = state, detail
        if state == "down" and changed:
            log.warning("%s: hub host unreachable (%s)", remote.url, detail)
        if changed:
            self._show(HubStatus(job_id="", port=remote.url, slot=self._slot_for(remote.url),
                                 state=state, detail=detail))

    @staticmethod
    def _call(callback: Callable[[PortInfo], None], info: PortInfo) -> None:
        try:
            callback(info)
        except Exception:  # a consumer's bug must not stop other hubs
            log.exception("port callback %r failed for %s", callback, info.path)


def _close(port: Any) -> None:
    with contextlib.suppress(Exception):
        port.close()


def probe_all(urls: Sequence[str], timeout: float = PROBE_TIMEOUT) -> list[tuple[str, str | None]]:
    """(url, None or why unreachable) for `station ports`: the hubs probed together, so
    one dead hub host costs `timeout` once, not once per port."""
    async def run() -> list[str | None]:
        ports = RemotePorts(urls, probe_timeout=timeout)
        return list(await asyncio.gather(*(ports._probe(*host_port(u)) for u in urls)))

    problems = asyncio.run(run())
    return [(url, None if p is None else f"hub host unreachable: {p}")
            for url, p in zip(urls, problems, strict=True)]
