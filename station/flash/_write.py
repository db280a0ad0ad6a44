"""The write loop: a region's blocks sent to the stub (or ROM) without esptool's per-byte
Python work.

esptool's `command()` formats every packet it sends for its trace log, enabled or not
(~11 ms of CPU per 16 KB block, twice), and its checksum loops over each byte in Python:
about 25 ms of CPU per block, which at 16 boards on two cores is the difference between
keeping up with 921600 baud and not. Here the packet is built and checked with bytes
operations; begin/finish and everything else go through esptool's loader unchanged, and
the timeouts are esptool's own (`_get_flash_defl_block_timeout`).
"""

from __future__ import annotations

import functools
import logging
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

from esptool.loader import DEFAULT_TIMEOUT, ERASE_WRITE_TIMEOUT_PER_MB, MAX_TIMEOUT, timeout_per_mb
from esptool.util import FatalError

from station.flash.firmware import xor_checksum
from station.parts import Region

log = logging.getLogger("station.flasher")
PACKET_HEADER = struct.Struct("<BBHI")
BLOCK_HEADER = struct.Struct("<IIII")
WRITE_BLOCK_ATTEMPTS = 3  # as esptool's flash_block / flash_defl_block


@functools.lru_cache(maxsize=16)  # keys: the images' compressed bytes (hash cached)
def _inflated_sizes(compressed: bytes, block: int) -> tuple[int, ...]:
    """How many flash bytes each compressed block becomes: computed once per image, not
    once per board (the timeouts and the progress depend on it)."""
    inflate = zlib.decompressobj()
    view = memoryview(compressed)
    return tuple(len(inflate.decompress(view[i:i + block]))
                 for i in range(0, len(compressed), block))


def _defl_block_timeout(esp: Any, inflated: int) -> float:
    """esptool's `_get_flash_defl_block_timeout`: the stub may erase while it inflates."""
    size = inflated
    if esp.IS_STUB:
        size += (-(-inflated // (32 * 1024)) + 1) * 64 * 1024
    return float(timeout_per_mb(ERASE_WRITE_TIMEOUT_PER_MB, size))


def _command(esp: Any, op: int, payload: bytes, chk: int, timeout: float, what: str) -> None:
    """esptool's check_command for one data packet, minus its per-byte Python work."""
    packet = PACKET_HEADER.pack(0, op, len(payload), chk) + payload
    frame = b"\xc0" + packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") \
        + b"\xc0"
    port = esp._port
    # Setting a timeout reconfigures the tty (tcsetattr): only when it changes, and it
    # is left as is afterwards (every esptool command sets its own).
    timeout = min(timeout, MAX_TIMEOUT)
    if port.timeout != timeout:
        port.timeout = timeout
    port.write(frame)
    for _ in range(100):  # skip stale replies, as esptool's command() does
        reply = esp.read()
        if len(reply) < 8:
            continue
        resp, op_ret, _, _ = PACKET_HEADER.unpack_from(reply)
        if resp == 1 and op_ret == op:
            status = reply[8:10]
            if len(status) < 2 or status[0] != 0:
                raise FatalError.WithResult(f"Failed to {what}", status)
            return
    raise FatalError(f"Failed to {what}: no matching reply")


def write_region(esp: Any, region: Region, report: Callable[[int], None], port: str,
                 aborted: Callable[[], bool]) -> None:
    """Write one region through esptool's loader `esp` (connected, stub or ROM), calling
    `report(bytes done)` after each block; a block that fails is sent again up to
    WRITE_BLOCK_ATTEMPTS times, unless the port was `aborted()`."""
    size = len(region.data)
    if size == 0:
        return
    block = esp.FLASH_WRITE_SIZE
    deflate = len(region.compressed) < size and (esp.IS_STUB or esp.CHIP_NAME == "ESP32")
    started = time.monotonic()
    done = 0
    timeout = DEFAULT_TIMEOUT
    if deflate:
        # Sizes come from the shared cache: one inflate per image, not per board.
        sizes = _inflated_sizes(region.compressed, block)
        esp.flash_defl_begin(size, len(region.compressed), region.offset,
                             encrypted_write=region.encrypted)
        view = memoryview(region.compressed)
        op = esp.ESP_CMDS["FLASH_DEFL_DATA"]
    else:  # incompressible data goes raw, as write_flash does
        sizes = tuple(min(block, size - i) for i in range(0, size, block))
        esp.flash_begin(size, region.offset, encrypted_write=region.encrypted)
        view = memoryview(region.data)
        op = esp.ESP_CMDS["FLASH_DATA"]
    for seq, inflated in enumerate(sizes):
        chunk: bytes | memoryview = view[seq * block:(seq + 1) * block]
        if not deflate and len(chunk) < block:
            chunk = bytes(chunk) + b"\xff" * (block - len(chunk))  # whole blocks only
        if deflate and not esp.IS_STUB:
            timeout = _defl_block_timeout(esp, inflated)
        payload = BLOCK_HEADER.pack(len(chunk), seq, 0, 0) + chunk
        chk = xor_checksum(chunk)
        what = f"write to flash at 0x{region.offset + done:x} (block {seq})"
        for attempt in range(WRITE_BLOCK_ATTEMPTS, 0, -1):
            try:
                _command(esp, op, payload, chk, timeout, what)
                break
            except FatalError:
                if attempt == 1 or aborted():
                    raise
                log.info("%s: %s failed, retrying", port, what)
                # a SLIP error ends esptool's reader generator (every later read says
                # "No more data to read"); flush_input drops the junk and starts anew
                esp.flush_input()
        if deflate and esp.IS_STUB:
            # the stub ACKs a block at once and writes it while the next one arrives
            timeout = _defl_block_timeout(esp, inflated)
        done += inflated
        report(done)
    if esp.IS_STUB:  # wait until the last block is really in flash
        if deflate:
            esp.flash_defl_finish(reboot=False, timeout=timeout)
        else:
            esp.flash_finish(reboot=False, timeout=timeout)
    log.debug("%s: wrote %s (%d B, %d B sent) at 0x%x in %.2fs", port, region.name,
              size, len(region.compressed) if deflate else size, region.offset,
              time.monotonic() - started)
