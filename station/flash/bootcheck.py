"""The boot check: did the board boot the firmware the station just wrote?

A flash whose MD5s match can still not boot: a bootloader at the wrong offset, a
partition table pointing elsewhere, a corrupt app. Every ESP32 tells its boot story once
on its UART at 115200 after a reset; this module holds what the story must say for one
firmware (`BootCheck`, built once per chip from the bundle) and judges a captured story
(pure text in, verdict out: no serial port here, reading the console is the flasher's).

What is checked, in the order the board prints it:
- "rom": the ROM booted from SPI flash (not download mode) and started the ESP-IDF
  second-stage bootloader ("2nd stage bootloader").
- "app": also `Loaded app from partition at offset 0x...` at the app partition of our
  table, then the app's description lines, tagged `cpu_start:` before ESP-IDF v5.3 and
  `app_init:` since: project name, app version and the ELF file SHA256 prefix (16 hex
  digits before v5.2, 9 since: any prefix of 9 or more must match), compared with the
  `esp_app_desc_t` of the app image we wrote (parsed from its first DROM segment with
  esptool's own image loader); then `[verify] marker`, if set.
- an app that reads its credentials with esp_secure_cert_mgr and says so (its image holds
  the format string of esp_secure_cert_mgr's example, `examples/esp_secure_cert_app/main/
  app_main.c`: ESP-IDF compiles log formats into the app) must also print that it read
  them: `Successfully obtained and verified the contents of esp_secure_cert partition`;
  its `Failed to obtain and verify ...` (a missing, erased or unreadable partition, a DS
  key that does not sign) fails the check with the lines before it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from esptool.bin_image import LoadFirmwareImage

from station.flash.firmware import FirmwareBundle
from station.parts import BootVerdict

APP_DESC_MAGIC = 0xABCD5432  # esp_app_format/include/esp_app_desc.h
_APP_DESC = struct.Struct("<II8x32s32s16s16s32s32s")  # magic .. app_elf_sha256
TAIL_LINES = 12  # the console lines kept in the ledger and quoted in a failure
_TAG = r"(?:app_init|cpu_start)"
_PROJECT = re.compile(_TAG + r": Project name:\s+(\S.*?)\s*$", re.M)
_VERSION = re.compile(_TAG + r": App version:\s+(\S.*?)\s*$", re.M)
_SHA = re.compile(_TAG + r": ELF file SHA256:\s+([0-9a-f]+)", re.M)
SECURE_CERT_OK = "Successfully obtained and verified the contents of esp_secure_cert partition"
SECURE_CERT_FAILED = "Failed to obtain and verify the contents of the esp_secure_cert partition"
_LOADED = re.compile(r"Loaded app from partition at offset 0x([0-9a-fA-F]+)")
_BOOTLOADER = re.compile(r"2nd stage bootloader")
_DOWNLOAD = re.compile(r"boot:0x[0-9a-f]+ \(DOWNLOAD")
_ROM = re.compile(r"rst:0x[0-9a-f]+ \(")
# ESP_LOGE's prefix: level and milliseconds
_ERROR = re.compile(r"E \(\d+\) ")
# ANSI SGR sequences: a CONFIG_LOG_COLORS=y build (ESP-IDF's default up to v5.3) wraps
# each log line in them (`\x1b[0;32mI (312) cpu_start: ...\x1b[0m`)
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """The console text without colour codes: what is matched, shown and stored."""
    return _SGR.sub("", text)


@dataclass(frozen=True)
class AppDescription:
    project: str
    version: str
    elf_sha256: str  # 64 hex digits


def app_description(chip: str, image: bytes) -> AppDescription | None:
    """The `esp_app_desc_t` at the start of the app's first DROM segment, or None."""
    try:
        loaded = LoadFirmwareImage(chip, image)
    except Exception:  # not an image esptool can read: nothing to compare with
        return None
    for segment in loaded.segments:
        if "DROM" in segment.get_memory_type(loaded):
            if len(segment.data) < _APP_DESC.size:
                return None
            magic, _sv, version, project, _t, _d, _idf, sha = _APP_DESC.unpack_from(
                segment.data)
            if magic != APP_DESC_MAGIC:
                return None
            return AppDescription(_text(project), _text(version), sha.hex())
    return None


def app_of(bundle: FirmwareBundle) -> tuple[int | None, AppDescription | None]:
    """(the app partition's offset, the description of the app written there): the
    factory app, else the first app partition."""
    apps = [p for p in bundle.partitions if p.type == 0]
    app = next((p for p in apps if p.subtype == 0), apps[0] if apps else None)
    image = next((r.data for r in bundle.regions if app and r.offset == app.offset), None)
    return (app.offset if app else None,
            app_description(bundle.chip, image) if image else None)


def _text(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("ascii", "replace")


def _tail(text: str) -> str:
    return "\n".join(_first_round(text)[-TAIL_LINES:])


def _first_round(text: str) -> list[str]:
    """The story's lines up to where a boot loop starts it over.

    The capture ends at the next round's ROM banner, maybe cut inside it; the lines the
    ROM prints before its `rst:` line (``ets ...``, ``ESP-ROM:...``/``Build:...``) are
    the first round's own, so the same lines right before the second `rst:` belong to
    the next round."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    banners = [i for i, line in enumerate(lines) if _ROM.search(line)]
    if len(banners) < 2:
        return lines
    preamble = set(lines[:banners[0]])
    cut = banners[1]
    while cut > banners[0] + 1 and lines[cut - 1] in preamble:
        cut -= 1
    return lines[:cut]


def _last(text: str) -> str:
    """What the board said last (in a boot loop: before it started over), with its
    first error line if that came earlier: the bootloader names the cause first
    (`esp_image: Checksum failed ...`) and its verdict last."""
    lines = _first_round(text)
    if not lines:
        return "nothing"
    error = next((line for line in lines if _ERROR.match(line)), lines[-1])
    return repr(lines[-1]) if error == lines[-1] else f"{error!r} ... {lines[-1]!r}"


@dataclass(frozen=True)
class BootCheck:
    """What one firmware's boot story must say; `timeout` bounds the capture."""

    level: str  # "rom" | "app"
    app_offset: int | None
    app: AppDescription | None
    marker: re.Pattern[str] | None
    timeout: float
    reads_secure_cert: bool = False  # the app prints whether it read esp_secure_cert

    @classmethod
    def for_bundle(cls, bundle: FirmwareBundle, level: str, marker: str | None,
                   timeout: float) -> BootCheck:
        offset, app = app_of(bundle)
        image = next((r.data for r in bundle.regions if r.offset == offset), b"")
        return cls(level=level, app_offset=offset, app=app,
                   marker=re.compile(marker) if marker else None, timeout=timeout,
                   reads_secure_cert=SECURE_CERT_OK.encode() in image)

    def complete(self, text: str) -> bool:
        """The story is told (or the board started over: a boot loop): judge it now."""
        text = plain(text)
        if len(_ROM.findall(text)) >= 2:
            return True
        if self.level == "rom":
            return bool(_BOOTLOADER.search(text))
        if not (_SHA.search(text) and _VERSION.search(text) and _PROJECT.search(text)):
            return False
        if self.reads_secure_cert and SECURE_CERT_OK not in text \
                and SECURE_CERT_FAILED not in text:
            return False
        if self.marker is None:
            return True
        return bool(self.marker.search(text.split("ELF file SHA256", 1)[1]))

    def judge(self, text: str) -> BootVerdict:
        text = plain(text)
        project = _group(_PROJECT, text)
        version = _group(_VERSION, text)
        detail = self._problem(text, project, version)
        return BootVerdict(ok=detail is None, detail=detail or "", project=project,
                           version=version, tail=_tail(text))

    def _problem(self, text: str, project: str | None, version: str | None) -> str | None:
        if not text.strip():
            return "the board printed nothing at 115200 after the reset (is it reset by " \
                   "its lines? a console on another UART?)"
        if _DOWNLOAD.search(text) and not _BOOTLOADER.search(text):
            return f"the board stayed in download mode after the reset (printed {_last(text)})"
        if not _BOOTLOADER.search(text):
            return f"expected the ESP-IDF 2nd stage bootloader to start; the board " \
                   f"printed {_last(text)}"
        if self.level == "rom":
            return None
        loaded = _group(_LOADED, text)
        if loaded is None:
            return f"expected \"Loaded app from partition at offset 0x{self.app_offset or 0:x}\"" \
                   f"; the board printed {_last(text)}"
        if self.app_offset is not None and int(loaded, 16) != self.app_offset:
            return f"expected the app at 0x{self.app_offset:x} (our partition table); the " \
                   f"board loaded it from 0x{int(loaded, 16):x}"
        if self.app is not None:
            if project != self.app.project:
                return f"expected project {self.app.project!r}; the board printed " \
                       f"{project!r}" if project else \
                       f"expected the app's lines (project {self.app.project!r}); the board " \
                       f"printed {_last(text)}"
            if version != self.app.version:
                return f"expected app version {self.app.version!r}; the board printed " \
                       f"{version!r}"
            sha = _group(_SHA, text) or ""
            if len(sha) < 9 or not self.app.elf_sha256.startswith(sha):
                return f"expected ELF SHA256 {self.app.elf_sha256[:16]}...; the board " \
                       f"printed {sha or 'none'}"
        if self.reads_secure_cert and SECURE_CERT_OK not in text:
            return "expected the app to read its esp_secure_cert partition (\"" + \
                SECURE_CERT_OK + f"\"); the board printed {_last(text)}"
        if self.marker is not None:
            after = text.split("ELF file SHA256", 1)[-1]
            if not self.marker.search(after):
                return f"expected the marker /{self.marker.pattern}/ after the app's " \
                       f"lines; the board printed {_last(text)}"
        return None


def _group(pattern: re.Pattern[str], text: str) -> str | None:
    m = pattern.search(text)
    return m.group(1) if m else None
