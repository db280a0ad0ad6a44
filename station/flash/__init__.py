"""Talking to the chip: the esptool session, the write loop, the plan per chip, firmware
bundles, the boot check.

    session.py    `EsptoolFlasher` opens boards; `EsptoolSession`: one thread per board,
                  identify, write, verify, reset, console
    _connect.py   the session's connect: port, ROM sync, stub, the baud ladder, BOOT + EN
    _write.py     the write loop: a region's blocks to the stub without esptool's per-byte work
    plan.py       what a board of each chip gets (`Plans`), built once at start
    firmware.py   the firmware bundle: images, partition table, checks, read once at start
    bootcheck.py  did the board boot the firmware just written? (its boot story, judged)
"""

from station.flash.bootcheck import BootCheck
from station.flash.firmware import (
    EXTENDED_HEADER,
    IMAGE_HEADER,
    PARTITION_ENTRY,
    PARTITION_MD5_MAGIC,
    PARTITION_TABLE_MAX,
    SEGMENT_HEADER,
    FirmwareBundle,
    load_firmware,
    xor_checksum,
)
from station.flash.plan import (
    CredentialsImage,
    CredentialsMaker,
    Plan,
    Plans,
    build_plans,
    firmware_warnings,
    load_bundles,
)
from station.flash.session import EsptoolFlasher, EsptoolSession

__all__ = [
    "EXTENDED_HEADER", "IMAGE_HEADER", "PARTITION_ENTRY", "PARTITION_MD5_MAGIC",
    "PARTITION_TABLE_MAX", "SEGMENT_HEADER", "BootCheck", "CredentialsImage", "CredentialsMaker",
    "EsptoolFlasher",
    "EsptoolSession", "FirmwareBundle", "Plan", "Plans", "build_plans", "firmware_warnings",
    "load_bundles", "load_firmware", "xor_checksum",
]
