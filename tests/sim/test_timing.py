"""Legacy stub model: a throttled 1 MB write takes what the model predicts.

(The legacy esptool stub, ``stub_model="legacy"``; esp-flasher-stub, esptool 5.6's
default, is covered by test_stub_timing.py.)

The prediction is computed here, independently of the simulator's code, from the bytes
esptool really sends (its own zlib level-9 stream, cut into 16 KB stub blocks, SLIP
escaping included) and the published figures: 10 bits per byte on the wire, 64 KB
block erase 150 ms, 4 KB sector erase 45 ms, 256 B page program 0.7 ms, flash reads at
10 MB/s. The host's own per-block work (esptool's checksums, the pty) is not part of
any line model, so it is measured by the same run with throttling off and added.
"""

from __future__ import annotations

import random
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from esptool.loader import ESPLoader

from station.sim import Rig

from .conftest import EsptoolResult, esptool

BAUD = 460800
APP_OFFSET = 0x10000
STUB_BLOCK = 0x4000


def line(nbytes: int, baud: int = BAUD) -> float:
    return nbytes * 10 / baud


def slip_len(packet: bytes) -> int:
    return len(packet) + packet.count(0xC0) + packet.count(0xDB) + 2


@dataclass
class WriteModel:
    seconds: float  # FLASH_DEFL_DATA blocks + FLASH_DEFL_END, as esptool times it
    line_seconds: float  # the part that is pure wire time
    compressed: int

    @property
    def exposed_flash(self) -> float:
        return self.seconds - self.line_seconds


def model_stub_compressed_write(app: bytes) -> WriteModel:
    """Event model of the stub protocol: ACK on receipt, flash work overlaps the next block."""
    comp = zlib.compress(app, 9)
    inflater = zlib.decompressobj()
    region_end = -(-(APP_OFFSET + len(app)) // 0x1000) * 0x1000
    erased = write_ptr = APP_OFFSET
    t = busy = pure = 0.0
    response = line(12)  # 8-byte header + 2 status bytes + 2 delimiters
    for seq, pos in enumerate(range(0, len(comp), STUB_BLOCK)):
        block = comp[pos : pos + STUB_BLOCK]
        out = len(inflater.decompress(block))
        data = struct.pack("<IIII", len(block), seq, 0, 0) + block
        request = line(slip_len(struct.pack("<BBHI", 0, 0x11, len(data),
                                            ESPLoader.checksum(block)) + data))
        write_ptr += out
        flash = -(-out // 256) * 0.0007
        while erased < write_ptr:
            if erased % 0x10000 == 0 and region_end - erased >= 0x10000:
                flash, erased = flash + 0.150, erased + 0x10000
            else:
                flash, erased = flash + 0.045, erased + 0x1000
        ack = max(t + request, busy)
        busy = ack + flash
        t = ack + response
        pure += request + response
    end_request = line(slip_len(struct.pack("<BBHII", 0, 0x12, 4, 0, 1)))
    t = max(t + end_request, busy) + response
    pure += end_request + response
    return WriteModel(t, pure, len(comp))


def wrote_seconds(result: EsptoolResult, size: int) -> float:
    """esptool's own timing of the write, recovered precisely from its kbit/s figure."""
    match = re.search(r"Wrote \d+ bytes .* in [\d.]+ seconds \(([\d.]+) kbit/s\)", result.output)
    assert match, result.output
    return size * 8 / 1000 / float(match.group(1))


def flash_app(tmp_path: Path, app_path: Path, throttle: bool) -> tuple[float, float, int]:
    """One real esptool write at 460800; returns (total s, write s, line-model s of traffic)."""
    with Rig(tmp_path / f"hub-{throttle}", seed=1, throttle=throttle,
             flash_timing=throttle, stub_model="legacy") as rig:
        board = rig.plug(chip="esp32")
        start = time.monotonic()
        result = esptool(board.port, "--baud", str(BAUD), "write-flash", hex(APP_OFFSET),
                         str(app_path), timeout=300)
        total = time.monotonic() - start
        assert result.returncode == 0, result.output
        traffic = dict(rig.board(board).link.traffic)
    return total, wrote_seconds(result, app_path.stat().st_size), \
        sum(line(n, baud) for baud, n in traffic.items())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_throttled_1mb_write_matches_model(tmp_path: Path) -> None:
    rng = random.Random(11)
    app = bytes(rng.choice(b"ESP32\x00\xc0\xdb") for _ in range(1 << 20))  # ~43 % compressed
    app_path = tmp_path / "app.bin"
    app_path.write_bytes(app)

    fast_total, fast_write, traffic_line = flash_app(tmp_path, app_path, throttle=False)
    total, write, _ = flash_app(tmp_path, app_path, throttle=True)

    model = model_stub_compressed_write(app)
    predicted_write = model.seconds + fast_write
    md5 = len(app) / 10e6
    # everything on the wire (stub upload at 115200 included) + flash not hidden by the
    # overlap + the final MD5 + the host's own time
    predicted_total = fast_total + traffic_line + model.exposed_flash + md5
    print(f"\n1 MB app, {model.compressed} B compressed, {BAUD} Bd:"
          f"\n  write phase: predicted {predicted_write:.2f} s, measured {write:.2f} s"
          f"\n  whole esptool run: predicted {predicted_total:.2f} s, measured {total:.2f} s"
          f"\n  no throttle: whole run {fast_total:.2f} s, write phase {fast_write:.2f} s")
    assert abs(write - predicted_write) <= 0.10 * predicted_write
    assert abs(total - predicted_total) <= 0.10 * predicted_total
    assert fast_total < total / 4
