"""A small reader of ESP-IDF NVS partitions, for tests and the soak checker.

It decodes what a board holds (from a flash dump or a generated image) without the
ESP-IDF: pages, the entry state bitmap, namespaces, primitive entries, strings and blobs,
both the single-page kind (V1, type 0x41) and the multi-page kind (V2: BLOB_DATA chunks
gathered by a BLOB_IDX). Layout, from ESP-IDF's nvs_flash (nvs_page.hpp, nvs_types.hpp):

    page (4096 B)  header 32 B: state u32, seq u32, version u8, 19 B, crc32 u32 of [4:28]
                   bitmap 32 B: 2 bits per entry (11 empty, 10 written, 00 erased)
                   126 entries of 32 B
    entry          ns u8, type u8, span u8, chunk u8, crc32 u32 of [0:4]+[8:32],
                   key 16 B (NUL-padded), data 8 B
    varlen data    size u16, 2 B, crc32 u32 of the payload, which fills the next span-1
                   entries
    BLOB_IDX data  total size u32, chunk count u8, chunk start u8

Entries with a bad CRC are skipped, as the firmware does; a later entry of the same key
replaces an earlier one (pages are read in sequence order).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PAGE_SIZE = 4096
ENTRY_SIZE = 32
ENTRIES_PER_PAGE = 126
FIRST_ENTRY = 64

STATE_ACTIVE = 0xFFFFFFFE
STATE_FULL = 0xFFFFFFFC
STATE_FREEING = 0xFFFFFFF8
READABLE_STATES = {STATE_ACTIVE, STATE_FULL, STATE_FREEING}

_PRIMITIVES = {
    0x01: "<B", 0x11: "<b", 0x02: "<H", 0x12: "<h",
    0x04: "<I", 0x14: "<i", 0x08: "<Q", 0x18: "<q",
}
SZ = 0x21
BLOB = 0x41
BLOB_DATA = 0x42
BLOB_IDX = 0x48
CHUNK_ANY = 0xFF

Value = bytes | str | int


class NvsFormatError(ValueError):
    """The image is not an NVS partition (or not one this reader understands)."""


@dataclass(frozen=True)
class _Entry:
    ns: int
    type: int
    chunk: int
    key: str
    data: bytes  # the entry's 8 data bytes
    payload: bytes  # for variable-length entries: the bytes after the header entry


def _crc(data: bytes) -> int:
    # ESP-IDF's crc32_le(0xffffffff, ...) equals zlib.crc32(..., 0xffffffff)
    return zlib.crc32(data, 0xFFFFFFFF) & 0xFFFFFFFF


def _entry_state(bitmap: bytes, index: int) -> int:
    bit = index * 2
    return (bitmap[bit // 8] >> (bit % 8)) & 0b11


def _page_entries(page: bytes) -> list[_Entry]:
    bitmap = page[32:64]
    entries: list[_Entry] = []
    i = 0
    while i < ENTRIES_PER_PAGE:
        state = _entry_state(bitmap, i)
        if state != 0b10:  # empty or erased
            i += 1
            continue
        raw = page[FIRST_ENTRY + i * ENTRY_SIZE: FIRST_ENTRY + (i + 1) * ENTRY_SIZE]
        ns, etype, span, chunk = raw[0], raw[1], raw[2], raw[3]
        (crc,) = struct.unpack_from("<I", raw, 4)
        if crc != _crc(raw[0:4] + raw[8:32]) or span == 0 or i + span > ENTRIES_PER_PAGE:
            i += 1  # a torn or corrupt entry: skip it like the firmware does
            continue
        key = raw[8:24].split(b"\0", 1)[0].decode(errors="replace")
        payload = b""
        if etype in (SZ, BLOB, BLOB_DATA):
            size, _, data_crc = struct.unpack_from("<HHI", raw, 24)
            start = FIRST_ENTRY + (i + 1) * ENTRY_SIZE
            payload = page[start:start + size]
            if len(payload) != size or _crc(payload) != data_crc:
                i += span
                continue
        entries.append(_Entry(ns=ns, type=etype, chunk=chunk, key=key, data=raw[24:32],
                              payload=payload))
        i += span
    return entries


def _pages(image: bytes) -> list[bytes]:
    if len(image) % PAGE_SIZE or not image:
        raise NvsFormatError(f"an NVS partition is a multiple of {PAGE_SIZE} bytes, "
                             f"not {len(image)}")
    found: list[tuple[int, bytes]] = []
    for offset in range(0, len(image), PAGE_SIZE):
        page = image[offset:offset + PAGE_SIZE]
        state, seq = struct.unpack_from("<II", page, 0)
        if state not in READABLE_STATES:
            continue
        (crc,) = struct.unpack_from("<I", page, 28)
        if crc != _crc(page[4:28]):
            continue
        found.append((seq, page))
    return [page for _, page in sorted(found, key=lambda item: item[0])]


def read_nvs(image: bytes) -> dict[str, dict[str, Value]]:
    """namespace -> key -> value (int, str without its NUL, or bytes) of an NVS image."""
    namespaces: dict[int, str] = {}
    values: dict[tuple[int, str], Value] = {}
    chunks: dict[tuple[int, str, int], bytes] = {}
    indexes: dict[tuple[int, str], tuple[int, int, int]] = {}
    for page in _pages(image):
        for e in _page_entries(page):
            if e.ns == 0 and e.type == 0x01:
                namespaces[e.data[0]] = e.key
                continue
            where = (e.ns, e.key)
            if e.type in _PRIMITIVES:
                fmt = _PRIMITIVES[e.type]
                values[where] = struct.unpack_from(fmt, e.data, 0)[0]
                indexes.pop(where, None)
            elif e.type == SZ:
                values[where] = e.payload.split(b"\0", 1)[0].decode(errors="replace")
                indexes.pop(where, None)
            elif e.type == BLOB:
                values[where] = e.payload
                indexes.pop(where, None)
            elif e.type == BLOB_DATA:
                chunks[(e.ns, e.key, e.chunk)] = e.payload
            elif e.type == BLOB_IDX:
                size, count, start = struct.unpack_from("<IBB", e.data, 0)
                indexes[where] = (size, count, start)
                values.pop(where, None)
    for (ns, key), (size, count, start) in indexes.items():
        parts = [chunks.get((ns, key, start + n)) for n in range(count)]
        if any(p is None for p in parts):
            continue  # an incomplete blob: the firmware would not return it either
        blob = b"".join(p for p in parts if p is not None)
        if len(blob) == size:
            values[(ns, key)] = blob
    result: dict[str, dict[str, Value]] = {}
    for (ns, key), value in values.items():
        name = namespaces.get(ns)
        if name is not None:
            result.setdefault(name, {})[key] = value
    return result
