"""Writing flash over the loader: FLASH_(DEFL_)BEGIN, the data blocks, FLASH_(DEFL_)END.

Split from :mod:`.board` (which mixes this in). The ROM erases the whole region at
FLASH_BEGIN and programs each block before it answers; the stub acknowledges a block on
receipt and erases/programs it while the next one is on the wire, per its model
(:mod:`.stub_model`).

**Encrypted writes.** esptool's ``--encrypt`` is a fifth word ``1`` in FLASH_BEGIN /
FLASH_DEFL_BEGIN (``loader.flash_begin``: the ESP32 ROM takes no fifth word, so ESP32
encrypted writes need the stub; esptool never sends FLASH_ENCRYPT_DATA). The data then
goes through the chip's flash encryption block with the eFuse key
(:mod:`.flash_crypto`): esp-flasher-stub calls the ROM's
``esp_rom_spiflash_write_encrypted`` for 16-byte-aligned data (esp-stub-lib
``stub_lib_flash_write_buff``), and only the image's own bytes are written
(``MIN(size, total_remaining)``), never the 0xFF padding of the last block. With
DIS_DOWNLOAD_MANUAL_ENCRYPT (ESP32: DISABLE_DL_ENCRYPT) burned, download mode cannot
encrypt: the ROM answers FLASH_BEGIN with 0x64 "Invalid parameter", as an ESP32-S3 in
release mode did in esptool#952 (trace ``010204000000000001640000``); the stub, which
checks no eFuse itself, fails the first data block with 0xC4 "Failed SPI operation"
(our reading: the ROM's encrypted write cannot succeed; not seen on hardware). esptool
refuses ``--encrypt`` on such a chip before sending anything (``cmds.write_flash``).
Plaintext writes are stored as given, encryption on or not.
"""

from __future__ import annotations

import asyncio
import enum
import struct
import zlib

from . import protocol as P
from .chips import ChipSpec
from .efuse import EfuseArray
from .flash import Flash
from .flash_crypto import ALIGN, FlashCipher, chip_cipher
from .stub_model import StubModel, StubWriter, stub_writer

ROM_INVALID_PARAMETER = 0x64  # esptool util.FatalError.WithResult: 0x164 "Invalid parameter"
STUB_FAILED_SPI_OP = 0xC4


class Mode(enum.Enum):
    ROM = "rom"
    STUB = "stub"
    APP = "app"  # "running user code": deaf to the protocol until reset
    RESET = "reset"  # EN held low by the reset circuit: the chip does nothing


class WriteSession:
    """State between FLASH_(DEFL_)BEGIN and the last block."""

    def __init__(self, offset: int, size: int, block_size: int, compressed: bool,
                 writer: StubWriter | None, cipher: FlashCipher | None = None) -> None:
        self.offset = offset
        self.end = offset + size
        self.block_size = block_size
        self.compressed = compressed
        self.inflater = zlib.decompressobj() if compressed else None
        self.write_ptr = offset
        self.next_seq = 0
        self.writer = writer  # the stub's erase/program schedule; None: the ROM's
        self.cipher = cipher  # encrypted write: the chip's flash encryption block
        self.carry = b""  # encrypted bytes waiting for a whole 16-byte block
        self.refused = False  # encrypted write the chip cannot do (stub: fails on data)

    def encrypt(self, addr: int, out: bytes) -> tuple[int, bytes]:
        """Encrypt what is 16-byte complete; keep the rest for the next block."""
        assert self.cipher is not None
        start = addr - len(self.carry)
        data = (self.carry + out)[: max(0, self.end - start)]
        whole = len(data) - len(data) % ALIGN
        self.carry = data[whole:]
        return start, self.cipher.encrypt(start, data[:whole])


class FlashWrites:
    """The flash-write commands of :class:`~.board.Board` (mixed into it)."""

    mode: Mode
    spec: ChipSpec
    flash: Flash
    efuses: EfuseArray
    stub_model: StubModel
    writers: list[StubWriter]
    _write: WriteSession | None
    _wrote_flash: bool
    _flash_busy_until: float

    # provided by the board
    async def _reply(self, op: int, value: int = 0, data: bytes = b"", status: int = 0,
                     error: int = 0) -> None:
        raise NotImplementedError

    async def _sleep_until(self, deadline: float) -> None:
        raise NotImplementedError

    async def _wait_flash_idle(self) -> None:
        raise NotImplementedError

    def _busy_until(self, when: float) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    async def _flash_begin(self, op: int, data: bytes) -> None:
        stub = self.mode is Mode.STUB
        if not stub and len(data) not in self.spec.rom_flash_begin_lens:
            raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_BAD_DATA_LEN)
        if stub and len(data) not in (16, 20):
            raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_BAD_DATA_LEN)
        size, _blocks, block_size, offset = struct.unpack_from("<IIII", data)
        encrypted = len(data) == 20 and struct.unpack_from("<I", data, 16)[0] != 0
        if not self.flash.check_range(offset, size):
            raise P.CommandError(P.ROM_FAILED, P.STUB_BAD_DATA_LEN)
        refused = encrypted and self.efuses.manual_encrypt_disabled
        if refused and not stub:
            raise P.CommandError(ROM_INVALID_PARAMETER, STUB_FAILED_SPI_OP)
        compressed = op == P.FLASH_DEFL_BEGIN
        self._wrote_flash = self._wrote_flash or size > 0
        writer = None
        if not stub and size:
            await asyncio.sleep(self.flash.erase(offset, size))  # ROM: erase up front
        elif stub:
            writer = stub_writer(self.stub_model, self.flash, offset, size)
            self.writers.append(writer)
            now = asyncio.get_running_loop().time()
            await self._sleep_until(writer.begin(now))
        cipher = chip_cipher(self.efuses) if encrypted else None
        session = WriteSession(offset, size, block_size, compressed, writer, cipher)
        session.refused = refused
        self._write = session
        await self._reply(op)

    async def _flash_data(self, op: int, data: bytes, chk: int) -> None:
        session = self._write
        if session is None or session.compressed != (op == P.FLASH_DEFL_DATA):
            raise P.CommandError(P.ROM_FAILED, P.STUB_NOT_IN_FLASH_MODE)
        size, seq, _, _ = struct.unpack_from("<IIII", data)
        payload = data[16:]
        if size != len(payload):
            raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_BAD_DATA_LEN)
        if P.checksum(payload) != chk:
            raise P.CommandError(P.ROM_BAD_CRC, P.STUB_BAD_CHECKSUM)
        await self._wait_flash_idle()
        if seq + 1 == session.next_seq:
            await self._reply(op)  # a retry of a block we already have: the ACK was lost
            return
        if seq != session.next_seq:
            raise P.CommandError(P.ROM_INVALID_MESSAGE, P.STUB_BAD_DATA_LEN)
        if session.refused:
            raise P.CommandError(ROM_INVALID_PARAMETER, STUB_FAILED_SPI_OP)
        if session.inflater is not None:
            try:
                out = session.inflater.decompress(payload)
            except zlib.error as e:
                raise P.CommandError(P.ROM_DEFLATE_ERROR, P.STUB_INFLATE_ERROR) from e
            addr = session.write_ptr
        else:
            out = payload
            addr = session.offset + seq * session.block_size
        out = out[: max(0, self.flash.size - addr)]
        session.next_seq += 1
        session.write_ptr = addr + len(out)
        if session.cipher is not None:
            addr, out = session.encrypt(addr, out)
        if session.writer is not None:
            # ACK on receipt; erasing and programming overlap the next block's transfer.
            await self._reply(op)
            start = max(asyncio.get_running_loop().time(), self._flash_busy_until)
            self._busy_until(session.writer.write(start, addr, out, session.compressed))
        else:
            await asyncio.sleep(self.flash.program(addr, out))
            await self._reply(op)

    async def _flash_end(self, op: int, data: bytes) -> None:
        (stay,) = struct.unpack("<I", data)
        self._write = None
        await self._reply(op)
        if not stay:
            if self.mode is Mode.STUB:
                # The stub's "reboot" re-enters the ROM download mode: esptool's
                # --after no-reset. Closing the port afterwards is not a reset.
                self._reset()
            else:
                self.mode = Mode.APP
