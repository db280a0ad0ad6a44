"""What the line and the flash allow at best: the line-rate floor, SLIP framing, the bytes
of a credentials partition, and the write phase on the rig's flash model with an
infinitely fast host. The figures of the benchmarks are held against these.
"""

from __future__ import annotations

from common import BAUD, CHIP, Firmware

BITS_PER_BYTE = 10


def line_seconds(nbytes: int, baud: int = BAUD) -> float:
    """The line-rate floor: 10 bits (start, 8 data, stop) per byte."""
    return nbytes * BITS_PER_BYTE / baud


def nvs_compressed_bytes(firmware: Firmware) -> int:
    """Bytes the credentials partition sends, for an AWS-sized certificate and EC key."""
    import base64
    import random

    from station.config import FirmwareSection
    from station.flash import load_firmware
    from station.identity import nvs_region
    from station.parts import DeviceCredentials

    bundle = load_firmware(FirmwareSection(chip=CHIP, flasher_args=firmware.flasher_args,
                                           images=()))
    part = bundle.partition("nvs")
    rng = random.Random(5)

    def pem(kind: str, der_bytes: int) -> str:
        body = base64.encodebytes(rng.randbytes(der_bytes)).decode()
        return f"-----BEGIN {kind}-----\n{body}-----END {kind}-----\n"

    creds = DeviceCredentials(thing_name="bench-240ac4000000",
                              certificate_pem=pem("CERTIFICATE", 860),
                              private_key_pem=pem("PRIVATE KEY", 138),
                              public_key_pem=pem("PUBLIC KEY", 91),
                              endpoint="a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com")
    region = nvs_region(creds, part.offset, part.size, "station")
    return len(region.compressed)


def frame_bytes(payload: int, escapes: int = 0) -> int:
    """A SLIP frame on the wire: 8-byte header, payload, escapes, two delimiters."""
    return 8 + payload + escapes + 2


def modelled_flash_seconds(firmware: Firmware, baud: int = BAUD) -> float:
    """What the write phase takes on the rig's flash model with an infinitely fast host.

    The stub (esptool's legacy flasher stub, which the rig models) ACKs a block on
    receipt, then erases what the block needs (64 KB blocks where aligned) and programs
    it while the next block is on the wire; the next block waits if the flash is still
    busy. The difference between this and the line-rate floor is the flash chip, not
    the host.
    """
    import zlib

    from station.config import FirmwareSection
    from station.flash import load_firmware
    from station.sim.flash import BLOCK, FlashTiming, erase_plan

    timing = FlashTiming()
    bundle = load_firmware(FirmwareSection(chip=CHIP, flasher_args=firmware.flasher_args,
                                           images=()))
    block = 0x4000  # the stub's FLASH_WRITE_SIZE
    reply = line_seconds(frame_bytes(2), baud)
    now = busy = 0.0
    for region in bundle.regions:
        inflate = zlib.decompressobj()
        data = region.compressed
        plan = erase_plan(region.offset, len(region.data))
        erased = write = region.offset
        now += line_seconds(frame_bytes(16) + frame_bytes(2), baud)  # FLASH_DEFL_BEGIN
        for i in range(0, len(data), block):
            chunk = data[i:i + block]
            escapes = chunk.count(0xC0) + chunk.count(0xDB)
            arrival = now + line_seconds(frame_bytes(16 + len(chunk), escapes), baud)
            start = max(arrival, busy)  # the stub takes the block once the flash is free
            now = start + reply
            out = len(inflate.decompress(chunk))
            write += out
            seconds = 0.0
            while plan and erased < write:
                addr, length = plan.pop(0)
                seconds += timing.erase(0, 1) if length == BLOCK else timing.erase(1, 0)
                erased = addr + length
            busy = start + seconds + timing.program(out)
        now = max(now, busy)  # FLASH_DEFL_END waits for the last block
    return now


def floors(firmware: Firmware, extra_compressed: int = 0) -> dict[str, float]:
    """The line-rate floor (s) for the firmware (+ e.g. the NVS partition)."""
    return {"bytes_sent": firmware.compressed + extra_compressed,
            "line_s": round(line_seconds(firmware.compressed + extra_compressed), 3)}
