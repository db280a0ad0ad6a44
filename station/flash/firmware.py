"""The firmware bundle: what every board gets, read and checked once at start.

`load_firmware` reads the images named by `[firmware]` (a list of images, or an ESP-IDF
`flasher_args.json`), checks everything that can be checked without a board (ESP image
headers and checksums, the chip each image was built for, the bootloader offset, overlap,
sizes against the flash size, the partition table) and builds one `Region` per image:
padded and compressed once, then shared read-only by every worker.

Every problem is a `FirmwareError(file, key, reason)`: one line naming the file and the
config key, e.g. ``app.bin: firmware.images[2].file: built for esp32s3 ...``.

`[firmware] image_checks = "warn"` is the escape hatch for the engineer who wants a bad
image on a board (to prove that the line's boot check catches it, or to flash a build
the checks here misjudge): problems of an image's *content* (header, checksum, appended
SHA256, the chip it was built for, a bootloader where the ROM does not look) become one
warning each, in the error's words, and the images are flashed as given. What makes
flashing itself impossible (a missing or empty file, past the end of flash, overlap, an
unaligned offset) and a partition table the station must read stay errors.

Chip facts (image chip id, bootloader offset, flash-size codes) come from esptool's target
classes through `station.chips`, and image headers and segments are read by esptool's own
`bin_image` parser; the checksum and the appended SHA256 are checked here, with messages
that say which part of the file is wrong (and without esptool's per-byte Python loop).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esptool.bin_image import ESP32FirmwareImage
from esptool.util import FatalError

from station import chips
from station.config import FirmwareSection
from station.errors import FirmwareError
from station.parts import Region

ESP_IMAGE_MAGIC = 0xE9
CHECKSUM_SEED = 0xEF
DEFAULT_FLASH_SIZE = 4 << 20
SECTOR = 0x1000  # the stub erases whole 4 KB sectors, so images may not share one
PARTITION_MAGIC = b"\xaa\x50"
PARTITION_MD5_MAGIC = b"\xeb\xeb" + b"\xff" * 14
PARTITION_TABLE_MAX = 0xC00
PARTITION_TYPES = {0: "app", 1: "data"}
IMAGE_HEADER = struct.Struct("<BBBBI")  # magic, segments, flash mode, size|freq, entry
EXTENDED_HEADER = struct.Struct("<BBBBHBHH4sB")  # ... chip id at field 4, hash at the end
SEGMENT_HEADER = struct.Struct("<II")  # load address, length
PARTITION_ENTRY = struct.Struct("<2sBBII16sI")


def xor_checksum(data: bytes | memoryview, state: int = CHECKSUM_SEED) -> int:
    """The ROM's XOR-of-all-bytes checksum, without a Python loop over the bytes.

    The bytes become one big integer whose halves are XOR-folded until one byte is left:
    log2(n) big-integer operations instead of n interpreter steps (esptool's own
    `ESPLoader.checksum` loops per byte, ~1 ms per 16 KB block per board).
    """
    n = len(data)
    if n == 0:
        return state
    x = int.from_bytes(data, "little")
    while n > 1:
        half = (n + 1) // 2
        x = (x >> (8 * half)) ^ (x & ((1 << (8 * half)) - 1))
        n = half
    return (x & 0xFF) ^ state


def parse_size(text: str) -> int | None:
    """Parse "4MB" -> 4194304; "detect" or "keep" declare no size -> None."""
    t = text.strip().upper()
    if t.endswith("MB") and t[:-2].isdigit():
        return int(t[:-2]) << 20
    if t.endswith("KB") and t[:-2].isdigit():
        return int(t[:-2]) << 10
    return None


@dataclass(frozen=True)
class Partition:
    """One row of an ESP-IDF partition table."""

    label: str
    type: int  # 0 app, 1 data
    subtype: int
    offset: int
    size: int
    flags: int

    @property
    def type_name(self) -> str:
        return PARTITION_TYPES.get(self.type, f"0x{self.type:02x}")

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class ImageInfo:
    """What an ESP image header says."""

    chip_id: int
    segments: int
    flash_mode: int
    flash_size: int | None
    entry: int
    length: int  # bytes up to and including the checksum (and the SHA256 if appended)


@dataclass(frozen=True)
class FirmwareBundle:
    """The images every board gets, each compressed once; immutable and shared."""

    chip: str
    regions: tuple[Region, ...]
    sha256: str  # over offsets and contents: the "firmware hash" in the ledger
    partitions: tuple[Partition, ...]
    flash_size: int  # the size the images were checked against
    source: str  # the flasher_args.json or the first image, for messages
    warnings: tuple[str, ...] = ()  # image_checks = "warn": the content problems found

    @property
    def total_bytes(self) -> int:
        return sum(len(r.data) for r in self.regions)

    @property
    def compressed_bytes(self) -> int:
        return sum(len(r.compressed) for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest byte written: a board's flash must be at least this big."""
        return max(r.end for r in self.regions)

    def partition(self, label: str) -> Partition:
        for p in self.partitions:
            if p.label == label:
                return p
        present = ", ".join(p.label for p in self.partitions) or "none: no partition table"
        raise FirmwareError(self.source, None,
                            f"no partition labelled {label!r} (partitions: {present})")

    def describe(self) -> str:
        """One line for the dashboard footer and `station check`."""
        n = len(self.warnings)
        warned = f", {n} image warning{'s' if n > 1 else ''} (image_checks = warn)" if n else ""
        return (f"{self.chip} {len(self.regions)} images {self.total_bytes / 1e6:.2f} MB "
                f"({self.compressed_bytes / 1e6:.2f} MB compressed) sha256 {self.sha256[:12]} "
                f"from {Path(self.source).name}{warned}")


@dataclass
class _Image:
    """One image while loading: where it came from and what it turned out to be."""

    offset: int
    file: Path
    key: str  # config key, for messages
    offset_key: str
    raw: bytes = b""
    role: str = "data"  # bootloader, app, partition-table, data
    info: ImageInfo | None = None

    def error(self, reason: str, offset: bool = False) -> FirmwareError:
        return FirmwareError(str(self.file), self.offset_key if offset else self.key, reason)


@dataclass
class _Checks:
    """Content problems: raised at once ("refuse"), or kept to warn about ("warn")."""

    mode: str
    found: list[FirmwareError]

    def problem(self, error: FirmwareError) -> None:
        if self.mode != "warn":
            raise error
        self.found.append(error)


def load_firmware(section: FirmwareSection, flash_size_hint: int | None = None) -> FirmwareBundle:
    """Read, check and compress the firmware named by `[firmware]`.

    Flash size the images must fit in: the size `flasher_args.json` declares, else the one
    in the bootloader's header, else `flash_size_hint` (a known board size), else 4 MB.
    """
    chip = section.chip
    checks = _Checks(section.image_checks, [])
    declared: int | None = None
    if section.flasher_args is not None:
        images, declared, source = _from_flasher_args(section.flasher_args, chip, checks,
                                                      section.key)
    else:
        images = [_Image(spec.offset, spec.file, f"{section.key}.images[{i}].file",
                         f"{section.key}.images[{i}].offset")
                  for i, spec in enumerate(section.images)]
        source = str(section.images[0].file) if section.images else "firmware"
    for img in images:
        _read(img)
    partitions: tuple[Partition, ...] = ()
    for img in images:
        if img.raw[:2] == PARTITION_MAGIC:
            if partitions:
                raise img.error("a second partition table (only one is flashed)")
            img.role = "partition-table"
            partitions = _parse_partitions(img)
    for img in images:
        _classify(img, chip, partitions, checks, section.key)
    if declared is None:
        boot = next((i for i in images if i.role == "bootloader" and i.info), None)
        declared = boot.info.flash_size if boot and boot.info else None
    flash_size = declared or flash_size_hint or DEFAULT_FLASH_SIZE
    _check_layout(images, partitions, flash_size)
    apps = [i for i in images if i.role == "app"]
    regions = tuple(Region.build(_name(img, len(apps)), img.offset, img.raw)
                    for img in sorted(images, key=lambda i: i.offset))
    digest = hashlib.sha256()
    for r in regions:
        digest.update(struct.pack("<II", r.offset, len(r.data)))
        digest.update(r.data)
    warned = f"flashed as given ({section.key}.image_checks = \"warn\")"
    return FirmwareBundle(chip=chip, regions=regions, sha256=digest.hexdigest(),
                          partitions=partitions, flash_size=flash_size, source=source,
                          warnings=tuple(f"{e}; {warned}" for e in checks.found))


def _name(img: _Image, apps: int) -> str:
    if img.role == "app" and apps == 1:
        return "app"
    if img.role in ("bootloader", "partition-table"):
        return img.role
    return img.file.name


def _from_flasher_args(path: Path, chip: str, checks: _Checks,
                       prefix: str = "firmware") -> tuple[list[_Image], int | None, str]:
    where = str(path)
    try:
        doc: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise FirmwareError(where, f"{prefix}.flasher_args", "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FirmwareError(where, f"{prefix}.flasher_args", f"not a flasher_args.json: {e}") \
            from None
    if not isinstance(doc, dict) or not isinstance(doc.get("flash_files"), dict) \
            or not doc["flash_files"]:
        raise FirmwareError(where, "flash_files", "missing or empty: is this an ESP-IDF "
                                                  "build's flasher_args.json?")
    extra = doc.get("extra_esptool_args", {})
    built_for = extra.get("chip") if isinstance(extra, dict) else None
    if built_for is not None and built_for != chip:
        checks.problem(FirmwareError(where, "extra_esptool_args.chip", f"the build is for "
                                     f"{built_for}, but {_chip_key(prefix)} is {chip}"))
    declared = None
    settings = doc.get("flash_settings", {})
    if isinstance(settings, dict) and isinstance(settings.get("flash_size"), str):
        declared = parse_size(settings["flash_size"])
    images = []
    for text, file in doc["flash_files"].items():
        key = f'flash_files["{text}"]'
        try:
            offset = int(text, 0)
        except (TypeError, ValueError):
            raise FirmwareError(where, key, "the offset is not a number") from None
        if not isinstance(file, str) or not file:
            raise FirmwareError(where, key, f"must be a file path, not {file!r}")
        images.append(_Image(offset, path.parent / file, key, key))
    return images, declared, where


def _read(img: _Image) -> None:
    try:
        img.raw = img.file.read_bytes()
    except FileNotFoundError:
        raise img.error("no such file") from None
    except OSError as e:
        raise img.error(f"cannot be read ({e.strerror})") from None
    if not img.raw:
        raise img.error("the file is empty")


def parse_image(data: bytes) -> ImageInfo:
    """Read an ESP image with esptool's parser; ValueError says what is wrong.

    esptool reads the header, the extended header and the segments; the checksum (the
    ROM refuses an image whose XOR checksum is wrong) and the appended SHA256 are checked
    here, so a corrupt file is named before any board gets it.
    """
    if len(data) < IMAGE_HEADER.size + EXTENDED_HEADER.size:
        raise ValueError(f"too short for an ESP image header ({len(data)} bytes)")
    if data[0] != ESP_IMAGE_MAGIC:
        raise ValueError(f"not an ESP image: first byte is 0x{data[0]:02x}, expected 0xe9")
    if data[1] == 0 or data[1] > 16:
        raise ValueError(f"implausible segment count {data[1]} in the image header")
    f = io.BytesIO(data)
    try:
        image = ESP32FirmwareImage(f)
    except FatalError as e:  # "End of file reading segment 0x..., length ..."
        raise ValueError(f"truncated: {e}") from None
    except struct.error:  # esptool unpacks a segment header it could not read in full
        raise ValueError("truncated: a segment header lies past the end of the file") \
            from None
    except TypeError:  # esptool's ord(f.read(1)) at the end of the file
        raise ValueError("truncated: no checksum byte after the segments") from None
    except RuntimeError as e:  # an append_digest byte that is neither 0 nor 1
        raise ValueError(f"corrupt extended header: {e.args[0] % e.args[1:]}") from None
    state = CHECKSUM_SEED
    for segment in image.segments:
        state = xor_checksum(segment.data, state)
    if image.checksum != state:
        raise ValueError(f"checksum mismatch (header says 0x{image.checksum:02x}, "
                         f"segments give 0x{state:02x}): the file is corrupt")
    length = f.tell() if image.data_length is None else image.data_length
    if image.append_digest:
        if len(image.stored_digest) < 32:
            raise ValueError("truncated: the appended SHA256 is missing")
        if image.stored_digest != image.calc_digest:
            raise ValueError("the appended SHA256 does not match: the file is corrupt")
        length += 32
    size_code = image.flash_size_freq & 0xF0
    known = {code: size for c in chips.supported()
             for code, size in chips.facts(c).flash_sizes.items()}
    return ImageInfo(chip_id=image.chip_id, segments=len(image.segments),
                     flash_mode=image.flash_mode, flash_size=known.get(size_code),
                     entry=image.entrypoint, length=length)


def _chip_key(prefix: str) -> str:
    return "[firmware] chip" if prefix == "firmware" else f"{prefix}.chip"


def _classify(img: _Image, chip: str, partitions: tuple[Partition, ...], checks: _Checks,
              prefix: str = "firmware") -> None:
    """Decide what an image is; bootloaders and apps must be valid images for `chip`."""
    if img.role == "partition-table":
        return
    app_offsets = {p.offset for p in partitions if p.type == 0}
    table_at = min((p.offset for p in partitions), default=0x8000)
    boot_at = chips.facts(chip).bootloader_offset
    must_be_image = img.offset == boot_at or img.offset in app_offsets
    if not must_be_image and img.raw[0] != ESP_IMAGE_MAGIC:
        return  # a data image (NVS, SPIFFS, ...): no header to check
    img.role = "bootloader" if img.offset < min(table_at, 0x8000) else "app"
    try:
        img.info = parse_image(img.raw)
    except ValueError as e:
        checks.problem(img.error(str(e)))
    if img.info is not None and img.info.chip_id != chips.facts(chip).image_chip_id:
        found = chips.by_image_id(img.info.chip_id) or f"chip id {img.info.chip_id}"
        checks.problem(img.error(f"built for {found} (image chip id {img.info.chip_id}), "
                                 f"but {_chip_key(prefix)} is {chip}"))
    if img.role == "bootloader" and img.offset != boot_at:
        checks.problem(img.error(f"a bootloader at 0x{img.offset:x}, but the {chip} ROM "
                                 f"loads it from 0x{boot_at:x}", offset=True))


def _parse_partitions(img: _Image) -> tuple[Partition, ...]:
    data = img.raw
    parts: list[Partition] = []
    pos = 0
    while pos + 32 <= min(len(data), PARTITION_TABLE_MAX):
        row = data[pos:pos + 32]
        if row[:2] == PARTITION_MAGIC:
            _, ptype, subtype, offset, size, label, flags = PARTITION_ENTRY.unpack(row)
            name = label.split(b"\0", 1)[0].decode("ascii", "replace")
            parts.append(Partition(name, ptype, subtype, offset, size, flags))
        elif row[:16] == PARTITION_MD5_MAGIC:
            if hashlib.md5(data[:pos]).digest() != row[16:]:
                raise img.error("partition table MD5 does not match its entries: corrupt")
        elif row == b"\xff" * 32:
            break
        else:
            raise img.error(f"partition table entry {pos // 32} is neither a partition "
                            "nor the end marker: corrupt")
        pos += 32
    labels = [p.label for p in parts]
    for label in labels:
        if labels.count(label) > 1:
            raise img.error(f"partition label {label!r} appears twice")
    return tuple(parts)


def _check_layout(images: list[_Image], partitions: tuple[Partition, ...],
                  flash_size: int) -> None:
    mb = f"{flash_size / (1 << 20):g} MB"
    for img in images:
        if img.offset % SECTOR:
            raise img.error(f"0x{img.offset:x} is not a multiple of 0x1000: the flash is "
                            "erased in 4 KB sectors", offset=True)
        if img.offset + len(img.raw) > flash_size:
            raise img.error(f"{len(img.raw)} bytes at 0x{img.offset:x} end at "
                            f"0x{img.offset + len(img.raw):x}, past the end of {mb} flash")
        for p in partitions:
            if p.offset == img.offset and len(img.raw) > p.size:
                raise img.error(f"{len(img.raw)} bytes do not fit partition {p.label!r} "
                                f"({p.size} bytes at 0x{p.offset:x})")
    ordered = sorted(images, key=lambda i: i.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        a_end = -(-(a.offset + len(a.raw)) // SECTOR) * SECTOR
        if b.offset < a_end:
            raise b.error(f"0x{b.offset:x} overlaps {a.file.name} (0x{a.offset:x}.."
                          f"0x{a.offset + len(a.raw) - 1:x}, sectors up to 0x{a_end:x})",
                          offset=True)
    for p in partitions:
        if p.end > flash_size:
            table = next(i for i in images if i.role == "partition-table")
            raise table.error(f"partition {p.label!r} ends at 0x{p.end:x}, past the end "
                              f"of {mb} flash")
