"""One virtual board: the ESP serial bootloader protocol, in ROM and in stub mode.

The board is a state machine fed by SLIP frames from its :class:`PtyLink`. Two tasks
run per host session: a *receiver* that stamps each frame with the time its last byte
would have crossed the UART, and a *processor* that waits for that time and answers.
Decoupling them is what lets the stub's overlap work as on hardware: the stub ACKs a
flash block as soon as it has it, then erases/programs it while the next block is
still on the wire. The flash is a single resource, "busy until" some loop time; the
next block's ACK (or any other command) only waits if the flash is still busy. The
ROM has no such overlap: it erases the whole region at FLASH_BEGIN and programs each
block before answering.

There is no CPU emulation. The stub that esptool uploads (MEM_BEGIN/MEM_DATA/MEM_END)
is accepted as bytes; when MEM_END jumps into the uploaded code the board greets with
"OHAI" and from then on behaves as esptool's stubs do (2 status bytes, raw MD5,
READ_FLASH with acks, erase commands, 16 KB blocks); when it erases and programs
follows the chosen stub model (:mod:`.stub_model`).

The board also notices the resets it can see (the RTC watchdog armed through
WRITE_REG; the host closing the port after writing flash) and reports them, so the rig
can count them and re-enumerate native-USB boards (:mod:`.usb`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import struct
from collections import Counter
from collections.abc import Awaitable, Callable

from . import protocol as P
from . import slip
from .chips import ChipSpec
from .efuse import EfuseArray
from .faults import Faults
from .flash import SECTOR, Flash
from .flash_session import FlashWrites, Mode, WriteSession
from .pty_link import ROM_BAUD, HostClosed, PtyLink
from .registers import Registers
from .stub_model import StubModel, StubWriter, identify_stub

# &rom_spiflash_legacy_funcs.read in the ESP32-S3 ROM (esptool loader.run_stub, "got with GDB")
S3_ROM_FLASH_READ_PTR = 0x3FCEF688
GARBAGE = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"

log = logging.getLogger(__name__)


class Board(FlashWrites):
    """Protocol state machine of one virtual ESP board."""

    def __init__(self, spec: ChipSpec, mac: bytes, flash: Flash, link: PtyLink,
                 faults: Faults | None = None, rng: random.Random | None = None,
                 on_unplug: Callable[[], None] | None = None,
                 on_reset: Callable[[str], Awaitable[None]] | None = None,
                 stub_model: StubModel = "flasher", efuses: EfuseArray | None = None) -> None:
        self.spec = spec
        self.mac = mac
        self.flash = flash
        # the chip's eFuses outlive resets (a file beside the flash dump, from the rig)
        self.efuses = efuses or EfuseArray(spec.name, seed=spec.registers(mac))
        self.link = link
        self.faults = faults or Faults()
        self.efuses.weak_block = self.faults.weak_efuse
        if self.faults.locked and self.efuses.fresh:  # burned by another line before
            self.efuses.lock(self.faults.locked, hashlib.sha256(b"other line" + mac).digest())
        self._rng = rng or random.Random(0)
        self._on_unplug = on_unplug
        self._on_reset = on_reset
        self.stub_model = stub_model
        self.writers: list[StubWriter] = []  # every stub write session, for tests
        self.flash_wait_s = 0.0  # replies held back by stub flash work, ever
        self.stub_uploaded: StubModel | None = None  # which of esptool's stubs ran last
        self.bytes_received = 0
        self.sessions = 0  # host opens seen, for tests and logs
        self.awaiting_host = False  # between sessions: the last close was seen (and reset)
        self.baud_changes: list[int] = []  # P.CHANGE_BAUDRATE rates received, ever
        self.commands: Counter[int] = Counter()  # requests received per opcode, ever
        self.ram_loads: list[tuple[int, int]] = []  # (address, bytes) per P.MEM_BEGIN, ever
        self.resets: list[str] = []  # kinds of the resets the board saw ("watchdog", ...)
        self._session_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # Set by the rig when the board's DTR/RTS reach a reset circuit (RFC 2217 face):
        # then a host's open or close is no reset; only EN (and the watchdog) reset it,
        # and the chip tells its boot story on the console (:mod:`.boot_console`).
        self.sees_lines = False
        self.on_chip_reset: Callable[[], None] | None = None  # watchdog reset, sees_lines
        self.log = logging.getLogger(f"{__name__}.{mac.hex(':')}")
        self._reset()

    # -- lifecycle ------------------------------------------------------------------

    def _reset(self) -> None:
        """Power-on/reset: ROM download mode, UART at 115200, registers as burned."""
        if self._watchdog is not None:
            self._watchdog.cancel()  # a reset stops the RTC watchdog too
        self.mode = Mode.ROM
        self.uart_baud = ROM_BAUD
        self.efuses.reset()
        self.regs = Registers(self.spec, self.mac, self.flash.size, self.link.baud, self.efuses)
        self._decoder = slip.Decoder()
        self._write: WriteSession | None = None
        self._mem: dict[int, bytearray] = {}
        self._mem_cursor: tuple[int, int] | None = None  # (offset, next seq)
        self._flash_busy_until = 0.0
        self._wrote_flash = False  # this session changed flash: closing it is a reset
        self._watchdog = None
        self._watchdog_fired = False

    async def run(self) -> None:
        """Serve host sessions forever; every close of the port resets the board.

        Resets the board can *see* are reported to ``on_reset`` (the rig counts them
        and re-enumerates native-USB boards): the RTC watchdog firing, and the host
        closing the port after a session that wrote flash (esptool's default
        ``--after hard-reset`` pulses RTS, which a pty cannot carry; the close that
        follows is the only trace of it). Every other close also returns the board to
        the ROM, silently: the next session must find download mode.
        """
        while True:
            self.awaiting_host = True
            await self.link.wait_host_open()
            self.awaiting_host = False
            self.sessions += 1
            if not self.sees_lines:
                self._reset()
            else:
                self._decoder = slip.Decoder()  # the chip runs on; only the link is new
            kind: str | None = None
            session = asyncio.create_task(self._session())
            try:
                await session
            except HostClosed:
                self.log.debug("host closed the port: reset to ROM")
                kind = "host-close" if self._wrote_flash and not self.sees_lines else None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._watchdog_fired or (task is not None and task.cancelling()):
                    session.cancel()
                    raise
                kind = "watchdog"
            finally:
                if self._watchdog is not None:
                    self._watchdog.cancel()
            if not self.sees_lines or kind == "watchdog":
                self._reset()
            if kind is not None:
                await self._reset_seen(kind)

    async def _reset_seen(self, kind: str) -> None:
        self.resets.append(kind)
        self.log.debug("reset (%s)", kind)
        if self._on_reset is not None:
            await self._on_reset(kind)  # native USB: the link is replaced in here
        if kind == "watchdog" and self.sees_lines and self.on_chip_reset is not None:
            self.on_chip_reset()  # boots per its straps and tells the story
            if self.link.host_is_open():
                with contextlib.suppress(HostClosed):
                    await self._session()
            return
        if kind == "watchdog" and self.link.host_is_open():
            # A bridge board's port stays open across the reset; the chip boots its
            # app and no longer speaks the protocol until the host closes the port.
            self.mode = Mode.APP
            with contextlib.suppress(HostClosed):
                await self._session()
            self._reset()

    def _arm_watchdog(self, seconds: float) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(seconds, self._fire_watchdog)

    def _fire_watchdog(self) -> None:
        self._watchdog_fired = True
        if self._session_task is not None:
            self._session_task.cancel()

    async def _session(self) -> None:
        self._session_task = asyncio.current_task()
        frames: asyncio.Queue[tuple[bytes, float] | None] = asyncio.Queue()
        receiver = asyncio.create_task(self._receive(frames))
        try:
            await self._process(frames)
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)

    async def _receive(self, frames: asyncio.Queue[tuple[bytes, float] | None]) -> None:
        try:
            while True:
                chunk, start, byte_time = await self.link.read()
                self.bytes_received += len(chunk)
                limit = self.faults.unplug_after
                if limit is not None and self.bytes_received >= limit:
                    self.log.info("fault: unplugging after %d bytes", self.bytes_received)
                    if self._on_unplug is not None:
                        self._on_unplug()
                    return
                if self.faults.garbage:
                    frames.put_nowait((b"", start + len(chunk) * byte_time))
                    continue
                for frame, end in self._decoder.feed(chunk):
                    frames.put_nowait((frame, start + end * byte_time))
        except HostClosed:
            frames.put_nowait(None)

    async def _next_frame(self, frames: asyncio.Queue[tuple[bytes, float] | None]) -> bytes:
        item = await frames.get()
        if item is None:
            raise HostClosed
        frame, arrival = item
        await self._sleep_until(arrival)
        return frame

    async def _process(self, frames: asyncio.Queue[tuple[bytes, float] | None]) -> None:
        while True:
            frame = await self._next_frame(frames)
            if self.faults.mute or self.mode in (Mode.APP, Mode.RESET):
                continue
            if self.mode is Mode.ROM and self.efuses.rom_download_disabled:
                continue  # DIS_DOWNLOAD_MODE / UART_DOWNLOAD_DIS: no loader to talk to
            if self.faults.garbage:
                await self.link.write(GARBAGE)
                continue
            await self._handle(frame, frames)

    # -- framing --------------------------------------------------------------------

    async def _sleep_until(self, deadline: float) -> None:
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _wait_flash_idle(self) -> None:
        delay = self._flash_busy_until - asyncio.get_running_loop().time()
        if delay > 0:
            self.flash_wait_s += delay  # time the host waited on the flash, not the line
            await asyncio.sleep(delay)

    def _busy_until(self, when: float) -> None:
        self._flash_busy_until = max(self._flash_busy_until, when)

    async def _reply(self, op: int, value: int = 0, data: bytes = b"", status: int = 0,
                     error: int = 0) -> None:
        # The ROM sends 4 status bytes (2 reserved), the stub 2: the legacy stub
        # (status, error); esp-flasher-stub a big-endian 16-bit code, error << 8
        # (its commands.h), which esptool's error table decodes as 0xC000...
        if self.mode is not Mode.STUB:
            tail = bytes([status, error, 0, 0])
        elif self.stub_model == "flasher":
            tail = bytes([error, 0]) if status else b"\x00\x00"
        else:
            tail = bytes([status, error])
        body = data + tail
        await self.link.write(slip.encode(struct.pack("<BBHI", 1, op, len(body), value) + body))

    async def _handle(self, frame: bytes,
                      frames: asyncio.Queue[tuple[bytes, float] | None]) -> None:
        if len(frame) < 8 or frame[0] != 0:
            return  # not a request (noise, or a stray P.READ_FLASH ack): ignored, as a ROM does
        op, size, chk = struct.unpack_from("<BHI", frame, 1)
        data = frame[8:]
        if len(data) != size:
            return
        self.commands[op] += 1
        if op == P.SYNC:
            if data == P.SYNC_PAYLOAD:
                value = P.ROM_SYNC_VALUE if self.mode is Mode.ROM else 0
                for _ in range(8):
                    await self._reply(P.SYNC, value)
            return
        if self.mode is Mode.ROM and self.efuses.rom_secure_download \
                and op not in P.SDM_ALLOWED:
            self.log.debug("secure download mode: command %#04x refused", op)
            await self._refuse()
            return
        try:
            await self._dispatch(op, data, chk, frames)
        except P.Unsupported:
            self.log.debug("command %#04x not in this ROM: refused", op)
            await self._refuse()
        except P.CommandError as e:
            code = e.stub_code if self.mode is Mode.STUB else e.rom_code
            self.log.debug("command %#04x failed with %#04x", op, code)
            await self._reply(op, status=1, error=code)
        except (struct.error, IndexError):
            self.log.debug("command %#04x malformed", op)
            await self._reply(op, status=1, error=P.STUB_BAD_DATA_LEN
                              if self.mode is Mode.STUB else P.ROM_INVALID_MESSAGE)

    async def _refuse(self) -> None:
        """The ROM's "unsupported command" answer: repeated (protocol.py)."""
        reply = struct.pack("<BBHI", 1, P.SDM_REFUSAL_OPCODE, 4, 0) + b"\x01\x05\x00\x00"
        for _ in range(P.SDM_REFUSAL_REPEATS):
            await self.link.write(slip.encode(reply))

    # -- commands -------------------------------------------------------------------

    async def _dispatch(self, op: int, data: bytes, chk: int,
                        frames: asyncio.Queue[tuple[bytes, float] | None]) -> None:
        stub = self.mode is Mode.STUB
        if op not in (P.FLASH_DATA, P.FLASH_DEFL_DATA):
            await self._wait_flash_idle()  # the stub is single-threaded about flash
        if op == P.READ_REG:
            (addr,) = struct.unpack("<I", data)
            await self._reply(op, self.regs.read(addr))
        elif op == P.WRITE_REG:
            if len(data) % 16:
                raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_BAD_DATA_LEN)
            delay = 0
            for pos in range(0, len(data), 16):
                addr, value, mask, delay_us = struct.unpack_from("<IIII", data, pos)
                self.regs.write(addr, value, mask)
                delay += delay_us
            if delay:
                await asyncio.sleep(delay / 1e6)
            await self._reply(op)
            if self.regs.watchdog_timeout is not None:
                self._arm_watchdog(self.regs.watchdog_timeout)
            pulled = self.faults.pull_after_burns
            if pulled is not None and self.efuses.program_count >= pulled \
                    and self._on_unplug is not None:
                self.log.info("fault: pulled after %d eFuse burns", pulled)
                self._on_unplug()
        elif op == P.MEM_BEGIN:
            size, _blocks, _blocksize, offset = struct.unpack("<IIII", data)
            self._mem_cursor = (offset, 0)
            self.ram_loads.append((offset, size))
            await self._reply(op)
        elif op == P.MEM_DATA:
            await self._mem_data(data, chk)
        elif op == P.MEM_END:
            await self._mem_end(data)
        elif op == P.SPI_ATTACH:
            if len(data) != (4 if stub else 8):
                raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_BAD_DATA_LEN)
            await self._reply(op)
        elif op == P.SPI_SET_PARAMS:
            struct.unpack("<IIIIII", data)
            await self._reply(op)
        elif op == P.CHANGE_BAUDRATE:
            new, _old = struct.unpack("<II", data)
            await self._reply(op)
            self.uart_baud = new
            self.baud_changes.append(new)
            self.log.debug("baud rate changed to %d", new)
        elif op in (P.FLASH_BEGIN, P.FLASH_DEFL_BEGIN):
            await self._flash_begin(op, data)
        elif op in (P.FLASH_DATA, P.FLASH_DEFL_DATA):
            await self._flash_data(op, data, chk)
        elif op in (P.FLASH_END, P.FLASH_DEFL_END):
            await self._flash_end(op, data)
        elif op == P.SPI_FLASH_MD5:
            addr, size, _, _ = struct.unpack("<IIII", data)
            if not self.flash.check_range(addr, size):
                raise P.CommandError(P.ROM_FAILED, P.STUB_BAD_DATA_LEN)
            await asyncio.sleep(self.flash.timing.read(size))
            digest = self.flash.md5(addr, size)
            await self._reply(op, data=digest if stub else digest.hex().encode())
        elif op == P.GET_SECURITY_INFO and self.spec.security_info_len:
            await self._reply(op, data=self.efuses.security_info(self.spec.chip_id,
                                                                 self.spec.security_info_len))
        elif op == P.READ_FLASH_SLOW and not stub and (hijack := self._hijacked_read()):
            await self._start_stub(hijack)  # no reply: the ROM's read "returns" into it
        elif op == P.READ_FLASH_SLOW and not stub:
            addr, size = struct.unpack("<II", data)
            if size > 64 or not self.flash.check_range(addr, size):
                raise P.CommandError(P.ROM_FAILED, P.STUB_BAD_DATA_LEN)
            await self._reply(op, data=self.flash.read(addr, size).ljust(64, b"\xff"))
        elif op == P.ERASE_FLASH and stub:
            self._wrote_flash = True
            await asyncio.sleep(self.flash.erase_all())
            await self._reply(op)
        elif op == P.ERASE_REGION and stub:
            addr, size = struct.unpack("<II", data)
            if addr % SECTOR or size % SECTOR or not self.flash.check_range(addr, size):
                raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_BAD_DATA_LEN)
            self._wrote_flash = True
            await asyncio.sleep(self.flash.erase(addr, size))
            await self._reply(op)
        elif op == P.READ_FLASH and stub:
            await self._read_flash(data, frames)
        elif op == P.RUN_USER_CODE and stub:
            self.mode = Mode.APP
        elif not stub and self.spec.name in P.REPEATS_UNSUPPORTED:
            raise P.Unsupported()
        else:
            raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_INVALID_COMMAND)

    async def _mem_data(self, data: bytes, chk: int) -> None:
        size, seq, _, _ = struct.unpack_from("<IIII", data)
        payload = data[16:]
        if size != len(payload) or self._mem_cursor is None:
            raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_BAD_DATA_LEN)
        if P.checksum(payload) != chk:
            raise P.CommandError(P.ROM_BAD_CRC, P.STUB_BAD_CHECKSUM)
        offset, next_seq = self._mem_cursor
        if seq != next_seq:
            raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_BAD_DATA_LEN)
        self._mem.setdefault(offset, bytearray()).extend(payload)
        self._mem_cursor = (offset, next_seq + 1)
        await self._reply(P.MEM_DATA)

    async def _mem_end(self, data: bytes) -> None:
        no_entry, entry = struct.unpack("<II", data)
        await self._reply(P.MEM_END)
        if no_entry:
            return
        if self.mode is Mode.ROM and self._in_loaded_code(entry):
            await self._start_stub(entry)
        else:
            self.mode = Mode.APP  # some other RAM image: runs, and no longer talks SLIP

    def _in_loaded_code(self, addr: int) -> bool:
        return any(start <= addr < start + len(seg) for start, seg in self._mem.items())

    def _hijacked_read(self) -> int | None:
        """The ESP32-S3 ROM's ``rom_spiflash_legacy_funcs.read`` pointer, when a host
        pointed it into uploaded code: esptool's way to start its stub on an S3 with
        secure boot on ("Bug in ESP32-S3 ROM prevents stub execution if secure boot is
        enabled", ``loader.run_stub``), triggered by READ_FLASH_SLOW. None otherwise."""
        if self.spec.name != "esp32s3":
            return None
        entry = self.regs.read(S3_ROM_FLASH_READ_PTR)
        return entry if entry and self._in_loaded_code(entry) else None

    @property
    def uart_baud(self) -> int:
        """The chip's UART0 rate; the link garbles when the host's port is at another."""
        return self._uart_baud

    @uart_baud.setter
    def uart_baud(self, baud: int) -> None:
        self._uart_baud = self.link.uart_baud = baud

    async def _start_stub(self, entry: int) -> None:
        """"Jump" into the uploaded flasher stub: it says hello at its UART's rate, which
        is the ROM's unless the chip's stub reprograms it (``ChipSpec.stub_resets_uart``)."""
        self.mode = Mode.STUB
        self.stub_uploaded = identify_stub({a: bytes(d) for a, d in self._mem.items()})
        if self.stub_uploaded not in (None, self.stub_model):
            self.log.warning("esptool uploaded the %s stub to a board modelling the %s "
                             "stub: its flash timing follows the %s one",
                             self.stub_uploaded, self.stub_model, self.stub_model)
        self._mem.clear()
        if self.spec.stub_resets_uart and self.stub_uploaded == "flasher":
            # esp-flasher-stub sets the divider for the ROM's stored rate (UartDev.baud_rate,
            # 115200 from the ROM's UART init); that the ROM's CHANGE_BAUDRATE leaves it so
            # is our assumption (closed ROM; docs/virtual-boards.md). The legacy stub's
            # start-up is not modelled.
            self.uart_baud = ROM_BAUD
        self.log.debug("stub running (entry %#010x)", entry)
        await self.link.write(slip.encode(b"OHAI"))

    async def _read_flash(self, data: bytes,
                          frames: asyncio.Queue[tuple[bytes, float] | None]) -> None:
        offset, length, block_size, in_flight = struct.unpack("<IIII", data)
        if not self.flash.check_range(offset, length) or block_size == 0 or in_flight == 0:
            raise P.CommandError(P.ROM_FAILED, P.STUB_BAD_DATA_LEN)
        await self._reply(P.READ_FLASH)
        sent = acked = 0
        md5 = hashlib.md5()
        while acked < length:
            while sent < length and sent - acked < in_flight * block_size:
                block = self.flash.read(offset + sent, min(block_size, length - sent))
                md5.update(block)
                sent += len(block)
                await self.link.write(slip.encode(block))
            ack = await self._next_frame(frames)
            if len(ack) == 4:
                acked = max(acked, struct.unpack("<I", ack)[0])
        await self.link.write(slip.encode(md5.digest()))
