"""A rig of virtual boards plugged into a "USB hub": one directory of by-path links.

Each plugged board gets a symlink named like a ``/dev/serial/by-path`` entry
(``pci-0000:00:14.0-usb-0:1.3:1.0-port0``) pointing at its pty, created atomically
(temporary link, then ``os.rename``) the way udev does, so a directory watcher never
sees a half-made port. Unplugging removes the link, closes the pty (the host's next
I/O fails, as with a yanked USB cable) and dumps the flash to ``flash-<mac>.bin``.

:class:`Rig` runs its own asyncio loop in a daemon thread, so synchronous code (tests,
benchmarks, the CLI) can drive it; every call into the loop has a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import random
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .board import Board
from .boot_console import BootConsole
from .chips import ChipSpec, chip_spec
from .efuse import EfuseArray, efuse_path
from .faults import Faults
from .flash import Flash, FlashTiming
from .hub_port import link_port
from .plugged import MacAllocator, PluggedBoard, by_path_name, fill_flash, format_mac, parse_size
from .pty_lines import PtyLinesListener
from .pty_link import OPEN_POLL_INTERVAL_S, PtyLink
from .reset_circuit import EN_CAP_UF, ResetCircuitKind, parse_reset_circuit
from .rfc2217_face import Rfc2217Face
from .slot import HubSlot, reenumerate
from .stub_model import StubModel, parse_stub_model
from .usb import DEFAULT_REENUMERATE_GAP, UsbLink, usb_link

DEFAULT_FLASH_SIZE = 4 * 1024 * 1024
CALL_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)
T = TypeVar("T")
EventCallback = Callable[[dict[str, Any]], None]


class Rig:
    """Many virtual boards behind by-path symlinks in ``directory``.

    >>> with Rig(tmp_path, seed=1, throttle=False, flash_timing=False) as rig:
    ...     b = rig.plug(chip="esp32")
    ...     # run esptool --port b.port ...
    ...     image = rig.flash(b)
    """

    def __init__(self, directory: str | os.PathLike[str], seed: int = 0, throttle: bool = True,
                 flash_timing: bool = True, on_event: EventCallback | None = None,
                 reenumerate_gap: float | tuple[float, float] = DEFAULT_REENUMERATE_GAP,
                 stub_model: StubModel = "flasher", rfc2217_base: int | None = None,
                 pty_lines: str | os.PathLike[str] | None = None,
                 persist: bool = False) -> None:
        self.directory = Path(directory)
        # persist: boards continue from the files an earlier run left (plugged.py)
        self.persist = persist
        self._known_macs: set[bytes] = set()  # plugged by this rig: a replug keeps all
        # Board i listens on rfc2217_base + i (0: each on a free port the system picks);
        # None: no RFC 2217 face unless a plug asks for one.
        self.rfc2217_base = rfc2217_base
        self.stub_model = parse_stub_model(stub_model)
        self.reenumerate_gap = reenumerate_gap
        self.directory.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.throttle = throttle
        self.flash_timing = flash_timing
        self._on_event = on_event
        self._macs = MacAllocator(seed)
        self._slots: dict[int, HubSlot] = {}
        self._unplugged_macs: dict[int, str] = {}
        self._pulls: dict[int, asyncio.Event] = {}  # unplugs in flight, by hub port
        self._next_index = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-rig",
                                        daemon=True)
        self._thread.start()
        self._closed = False
        # A relay started with pty_lines.relay_env(pty_lines) sets DTR/RTS on the ptys:
        # every bridge board then has its reset circuit (:mod:`.pty_lines`).
        self._pty_lines: PtyLinesListener | None = None
        if pty_lines is not None:
            listener = PtyLinesListener(pty_lines, self._pty_lines_changed)
            try:
                self._call(self._start_listener(listener))
            except BaseException:
                self.close()
                raise
            self._pty_lines = listener

    # -- public API -----------------------------------------------------------------

    def plug(self, chip: str = "esp32", mac: str | bytes | None = None,
             flash_size: int | str = DEFAULT_FLASH_SIZE, faults: Faults | None = None,
             index: int | None = None, usb: str = "bridge", bridge: str | None = None,
             reenumerate_gap: float | tuple[float, float] | None = None,
             preloaded: bool = False, stub_model: StubModel | None = None,
             rfc2217_port: int | None = None, reset_circuit: str = "auto",
             app_line: str | None = None, en_cap_uf: float = EN_CAP_UF,
             revision: str | None = None) -> PluggedBoard:
        """Plug a new board; returns once its by-path link exists.

        ``usb`` is how it hangs off the hub: "bridge" (a USB-UART bridge, kind
        ``bridge``, default cp2102n), "jtag" (the chip's USB-Serial/JTAG) or "otg".
        Native boards (jtag, otg) re-enumerate after every reset they see, off the bus
        for ``reenumerate_gap`` seconds (a number, or a (low, high) range drawn from
        the seed; default: the rig's). A new board's flash is blank (0xFF), as from
        the factory; ``preloaded=True`` gives it old firmware (seeded pseudo-random
        bytes in the first 2 MB), which the flasher stub must erase. ``stub_model``
        ("flasher", "legacy"; default: the rig's) picks the stub's flash schedule.

        ``rfc2217_port`` gives the board an RFC 2217 face on that TCP port (0: a free
        one; default: the rig's ``rfc2217_base`` + index, if set). A bridge board with
        a face has a reset circuit: ``reset_circuit="auto"`` (the devkit's DTR/RTS
        transistors) or ``"none"`` (buttons only: :meth:`press_boot_en`); its chip then
        boots from flash after EN and prints its boot story, ending with ``app_line``.
        ``en_cap_uf`` is the EN capacitor (10 uF; the RC delay, :mod:`.reset_circuit`).
        """
        if en_cap_uf <= 0:
            raise ValueError(f"the EN capacitor must be positive, got {en_cap_uf} uF")
        circuit = parse_reset_circuit(reset_circuit)
        spec = chip_spec(chip, revision)
        link_kind = usb_link(spec, usb, bridge)
        gap = self.reenumerate_gap if reenumerate_gap is None else reenumerate_gap
        model = self.stub_model if stub_model is None else parse_stub_model(stub_model)
        size = parse_size(flash_size) if isinstance(flash_size, str) else flash_size
        # A board pulled by a fault is still being put away (flash dumped, MAC freed)
        # when the station already saw it go: plugging it back must wait for that.
        self._call(self._pulls_finished())
        with self._lock:
            if index is None:
                index = self._next_index
            if index in self._slots:
                raise ValueError(f"hub port {index} is already in use")
            self._next_index = max(self._next_index, index + 1)
            if mac is None:
                mac_bytes = self._macs.next()
            else:
                mac_bytes = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) else mac
                if len(mac_bytes) != 6:
                    raise ValueError(f"a MAC has 6 bytes, got {mac!r}")
                self._macs.reserve(mac_bytes)
        if rfc2217_port is None and self.rfc2217_base is not None:
            rfc2217_port = self.rfc2217_base + index if self.rfc2217_base else 0
        return self._call(self._plug(index, spec, mac_bytes, size, faults or Faults(),
                                     link_kind, gap, preloaded, model, rfc2217_port,
                                     circuit, app_line, en_cap_uf))

    def unplug(self, board: PluggedBoard | int) -> None:
        """Pull the board out: link removed, pty closed, flash dumped. Idempotent."""
        index = board if isinstance(board, int) else board.index
        self._call(self._unplug(index, reason="requested"))

    def flash(self, board: PluggedBoard | int) -> bytes:
        """A copy of the board's current flash contents."""
        index = board if isinstance(board, int) else board.index
        return self._call(self._flash_copy(index))

    def dump(self, board: PluggedBoard | int) -> Path:
        """Write the board's flash to its dump file now, and return the path."""
        index = board if isinstance(board, int) else board.index
        return self._call(self._dump(index))

    def replug(self, board: PluggedBoard | int) -> PluggedBoard:
        """Pull the board out and plug it back into the same hub port.

        A physical unplug: ``unplugged`` then ``plugged`` events, a new pty, the same
        MAC, chip, USB kind and flash contents (from the dump). Works on any board, a
        native one included (unlike a reset, which only re-enumerates it).
        """
        info = self.info(board)
        self.unplug(info)
        port = None
        if info.rfc2217 is not None:
            port = int(info.rfc2217.rsplit(":", 1)[1])
        return self.plug(chip=info.chip, mac=info.mac, flash_size=len(self.flash(info)),
                         faults=info.faults, index=info.index, usb=info.usb,
                         bridge=info.bridge, stub_model=parse_stub_model(info.stub_model),
                         rfc2217_port=port, reset_circuit=info.reset_circuit or "auto",
                         app_line=info.app_line, en_cap_uf=info.en_cap_uf or EN_CAP_UF,
                         revision=info.revision)

    def press_boot_en(self, board: PluggedBoard | int) -> None:
        """A person holds BOOT and taps EN: the board enters download mode.

        The way into download mode for a board without an auto-reset circuit. Returns
        once BOOT is released (the ROM has latched the strap and printed its banner).
        """
        self._call(self._console(board).circuit.press_boot_en())

    def press_en(self, board: PluggedBoard | int) -> None:
        """A person taps EN alone: the board boots from flash."""
        self._call(self._console(board).circuit.press_en())

    def boot_modes(self, board: PluggedBoard | int) -> list[str]:
        """What the chip latched at each EN wake since plugged: "download" or "flash"."""
        return ["download" if low else "flash" for low in self._console(board).circuit.boots]

    def console(self, board: PluggedBoard | int) -> str:
        """Everything the board's chip printed on its console since it was plugged."""
        return "".join(self._console(board).printed)

    def _console(self, board: PluggedBoard | int) -> BootConsole:
        index = board if isinstance(board, int) else board.index
        console = self._slots[index].console
        if console is None:
            raise ValueError(f"board at hub port {index} has no reset circuit: plug it as "
                             "a bridge board with an RFC 2217 face or on a rig with "
                             "pty_lines")
        return console

    def info(self, board: PluggedBoard | int) -> PluggedBoard:
        """The board as it is now (``pty`` changes when a native board re-enumerates)."""
        index = board if isinstance(board, int) else board.index
        slot = self._slots.get(index)
        if slot is None:
            if isinstance(board, PluggedBoard):
                return board
            raise KeyError(f"no board was plugged at hub port {index}")
        return slot.info

    def resets(self, board: PluggedBoard | int) -> list[str]:
        """Kinds of the resets the board saw since it was plugged, in order."""
        return list(self.board(board).resets)

    def reset_count(self, board: PluggedBoard | int) -> int:
        """How many resets the board saw since it was plugged (watchdog, host-close)."""
        return len(self.board(board).resets)

    def reenumerations(self, board: PluggedBoard | int) -> int:
        """How many times a native board came back on the bus since it was plugged."""
        index = board if isinstance(board, int) else board.index
        return self._slots[index].reenumerations

    def board(self, board: PluggedBoard | int) -> Board:
        """The live board object (protocol state, counters), for white-box tests."""
        index = board if isinstance(board, int) else board.index
        return self._slots[index].board

    def await_host_close(self, board: PluggedBoard | int, timeout: float = 5.0) -> None:
        """Return once the board saw the host close its port (without reset lines, its
        reset): a close and reopen faster than the board notices is no reset (a pty
        model limit, docs/virtual-boards.md). For tests that reopen a port at once."""
        live = self.board(board)

        async def seen() -> None:
            while not live.awaiting_host:
                await asyncio.sleep(OPEN_POLL_INTERVAL_S)
        self._call(asyncio.wait_for(seen(), timeout))

    @property
    def boards(self) -> list[PluggedBoard]:
        """Boards currently plugged, by index."""
        return [slot.info for _, slot in sorted(self._slots.items())]

    def close(self) -> None:
        """Unplug every board (dumping flash), then stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._unplug_all())
            if self._pty_lines is not None:
                self._loop.call_soon_threadsafe(self._pty_lines.close)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=CALL_TIMEOUT_S)
            self._loop.close()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loop side ------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed and not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the rig is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _emit(self, event: dict[str, Any]) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("event callback failed")

    async def _plug(self, index: int, spec: ChipSpec, mac: bytes, size: int, faults: Faults,
                    usb: UsbLink, gap: float | tuple[float, float], preloaded: bool,
                    stub_model: StubModel, rfc2217_port: int | None = None,
                    circuit: ResetCircuitKind = "auto",
                    app_line: str | None = None,
                    en_cap_uf: float = EN_CAP_UF) -> PluggedBoard:
        chip, rng = spec.name, random.Random(self.seed * 1_000_003 + index)
        link = self._new_link(faults, rng, usb)
        flash = Flash(size, FlashTiming(enabled=self.flash_timing, slow=faults.slow_flash))
        port = self.directory / by_path_name(index)
        info = PluggedBoard(index=index, port=str(port), pty=link.slave_path,
                            mac=format_mac(mac), chip=chip,
                            dump_path=self.directory / f"flash-{mac.hex()}.bin", faults=faults,
                            usb=usb.kind, bridge=usb.bridge.name if usb.bridge else None,
                            vid_pid=str(usb.describe()["vid_pid"]), max_baud=usb.max_baud,
                            preloaded=preloaded, stub_model=stub_model, revision=spec.revision)
        known = self.persist or mac in self._known_macs
        self._known_macs.add(mac)
        fill_flash(flash.data, f"preloaded-{self.seed}-{mac.hex()}" if preloaded else None,
                   info.dump_path if known else None)

        def fault_unplug() -> None:
            asyncio.get_running_loop().create_task(self._unplug(index, reason="fault"))

        async def on_reset(kind: str) -> None:
            await self._board_reset(index, kind)

        efuses = EfuseArray(chip, efuse_path(self.directory, mac), spec.registers(mac),
                            load=known)
        board = Board(spec, mac, flash, link, faults, rng, on_unplug=fault_unplug,
                      on_reset=on_reset, stub_model=stub_model, efuses=efuses)
        task = asyncio.get_running_loop().create_task(board.run(), name=f"board-{index}")
        gap_rng = random.Random(f"usb-gap-{self.seed}-{index}")
        slot = self._slots[index] = HubSlot(info, board, link, task, usb, gap, gap_rng)
        extra: dict[str, Any] = {}
        # native USB's own reset logic is not modelled; a bridge's DTR/RTS reach the
        # board through its RFC 2217 face or from a relay on its pty
        has_circuit = not usb.native and (rfc2217_port is not None
                                          or self._pty_lines is not None)
        if has_circuit:
            slot.console = BootConsole(board, circuit, app_line, on_reset, en_cap_uf)
            slot.console.power_on()
            info = slot.info = dataclasses.replace(info, reset_circuit=circuit,
                                                   app_line=app_line, en_cap_uf=en_cap_uf)
            extra = {"reset_circuit": circuit, "app_line": app_line, "en_cap_uf": en_cap_uf}
        if rfc2217_port is not None:
            console = slot.console

            def lines(dtr: bool, rts: bool) -> None:
                if console is not None:
                    console.set_lines(dtr, rts)

            def pty() -> str | None:
                live = self._slots.get(index)
                return None if live is None or live.link.closed else live.link.slave_path

            slot.face = Rfc2217Face(rfc2217_port, pty, lines, name=f"board {index}")
            try:
                await slot.face.start()
            except ValueError:
                self._slots.pop(index)
                task.cancel()
                link.close()
                raise
            info = slot.info = dataclasses.replace(info, rfc2217=slot.face.url)
            extra = {"rfc2217": info.rfc2217, "reset_circuit": info.reset_circuit,
                     "app_line": info.app_line, "en_cap_uf": info.en_cap_uf}
        slot.hold_if_busy()
        link_port(port, link.slave_path)
        log.info("plugged %s %s at %s -> %s", chip, info.mac, port, link.slave_path)
        self._emit({"event": "plugged", "index": index, "port": info.port, "pty": info.pty,
                    "mac": info.mac, "chip": chip, **usb.describe(), "preloaded": preloaded,
                    "stub_model": stub_model, **extra})
        return info

    async def _start_listener(self, listener: PtyLinesListener) -> None:
        listener.start()

    def _pty_lines_changed(self, pty: str, dtr: bool, rts: bool, at: float | None) -> None:
        """A relay set DTR/RTS on ``pty``: to the circuit of the board behind it."""
        for slot in self._slots.values():
            if slot.link.slave_path == pty and not slot.link.closed:
                if slot.console is not None:
                    slot.console.set_lines(dtr, rts, at)
                return

    def _new_link(self, faults: Faults, rng: random.Random, usb: UsbLink) -> PtyLink:
        return PtyLink(throttle=self.throttle, corrupt_rate=faults.corrupt, rng=rng,
                       max_baud=usb.max_baud, usb_bytes_per_s=usb.bytes_per_s)

    async def _board_reset(self, index: int, kind: str) -> None:
        """A board saw a reset: count it; a native-USB board drops off and comes back."""
        slot = self._slots.get(index)
        if slot is None:  # an EN wake racing the unplug
            return
        info = slot.info
        self._emit({"event": "reset", "index": index, "port": info.port, "mac": info.mac,
                    "kind": kind, "count": len(slot.board.resets), "usb": slot.usb.kind})
        if not slot.usb.native:
            return
        rng = random.Random(self.seed * 1_000_003 + index + 7919 * (slot.reenumerations + 1))
        await reenumerate(slot, index, self._new_link(info.faults, rng, slot.usb), self._emit)

    async def _pulls_finished(self) -> None:
        for pull in list(self._pulls.values()):
            await pull.wait()

    async def _unplug(self, index: int, reason: str) -> None:
        slot = self._slots.pop(index, None)
        if slot is None:
            return
        pull = self._pulls[index] = asyncio.Event()
        try:
            await self._put_away(slot, index, reason)
        finally:
            del self._pulls[index]
            pull.set()

    async def _put_away(self, slot: HubSlot, index: int, reason: str) -> None:
        self._unplugged_macs[index] = slot.info.mac.replace(":", "")
        if slot.face is not None:
            await slot.face.close()  # the station sees the far end close
        if slot.console is not None:
            slot.console.circuit.cancel()
        slot.task.cancel()
        await asyncio.gather(slot.task, return_exceptions=True)
        slot.release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.info.port)
        slot.link.close()
        slot.board.flash.dump(slot.info.dump_path)
        slot.board.efuses.save()  # also saved after every burn; efuse-<mac>.bin
        with self._lock:
            self._macs.release(bytes.fromhex(slot.info.mac.replace(":", "")))
        log.info("unplugged %s (%s)", slot.info.mac, reason)
        self._emit({"event": "unplugged", "index": index, "port": slot.info.port,
                    "mac": slot.info.mac, "reason": reason, "dump": str(slot.info.dump_path)})

    async def _unplug_all(self) -> None:
        for index in list(self._slots):
            await self._unplug(index, reason="shutdown")
        # Let fault-triggered unplugs still in flight finish before the loop stops.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)

    async def _flash_copy(self, index: int) -> bytes:
        slot = self._slots.get(index)
        if slot is None:  # unplugged: its flash lives on in the dump file
            return self.directory.joinpath(f"flash-{self._unplugged_macs[index]}.bin").read_bytes()
        return bytes(slot.board.flash.data)

    async def _dump(self, index: int) -> Path:
        slot = self._slots[index]
        slot.board.flash.dump(slot.info.dump_path)
        return slot.info.dump_path
