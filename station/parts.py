"""The interfaces a board's worker drives: a flasher (the serial edge) and what it writes.

The worker takes these as arguments, so the core never imports esptool, boto3 or the
terminal; the adapters (flash/, identity/registrar/) implement them at the edge. What
passes from one stage package to another through the worker lives here too: a board's
credentials go from identity/ (the registrar) to flash/ (the plan's data partition).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Region:
    """One image at one flash offset, padded and compressed once, shared by every worker.

    esptool pads every image to 4 bytes before writing and hashes the padded bytes, so
    the padding happens here, once, and the MD5 matches what the board reports.
    """

    name: str
    offset: int
    data: bytes
    compressed: bytes = field(repr=False)
    md5: str
    encrypted: bool = False
    """Written with esptool's --encrypt: the chip encrypts `data` with its burned key, and
    `md5` is that of the ciphertext the flash then holds (station/security)."""

    @classmethod
    def build(cls, name: str, offset: int, raw: bytes) -> Region:
        data = raw + b"\xff" * (-len(raw) % 4)
        return cls(
            name=name,
            offset=offset,
            data=data,
            compressed=zlib.compress(data, 9),
            md5=hashlib.md5(data).hexdigest(),
        )

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True)
class BoardIdentity:
    """What a board says about itself once connected."""

    chip: str  # "esp32", "esp32s3", "esp32c3"
    mac: str  # 12 lower-case hex digits
    flash_size: int | None = None  # bytes, when the flash ID is known


@dataclass(frozen=True)
class BootVerdict:
    """A boot story judged (station/flash/bootcheck.py)."""

    ok: bool
    detail: str  # what was expected and what the board printed ("" when ok)
    project: str | None
    version: str | None
    tail: str  # the last console lines


class BootJudge(Protocol):
    """What a firmware's boot story must say; the worker asks, the flasher reads."""

    @property
    def timeout(self) -> float:
        """Seconds the console is read for at most."""

    def complete(self, text: str) -> bool: ...

    def judge(self, text: str) -> BootVerdict: ...


@dataclass(frozen=True)
class DeviceCredentials:
    """Everything a board needs to talk to its broker (a registrar makes them, the
    plan's credentials region carries them to the flash). Never log this object's keys."""

    thing_name: str
    certificate_pem: str
    private_key_pem: str
    public_key_pem: str
    endpoint: str
    ca_pem: str | None = None
    certificate_id: str | None = None
    certificate_arn: str | None = None

    def __repr__(self) -> str:  # keeps the private key out of logs and tracebacks
        return f"DeviceCredentials(thing_name={self.thing_name!r}, id={self.certificate_id!r})"


class Clock(Protocol):
    """The worker's time: tests may pass one that does not wait."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        import time

        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)


ProgressFn = Callable[[int, int], None]
"""(bytes done, bytes total) of the current region; called on the event loop thread."""


class BoardSession(Protocol):
    """An open, synced connection to one board (stub running, baud raised)."""

    async def identify(self) -> BoardIdentity: ...

    async def write(self, region: Region, progress: ProgressFn) -> None:
        """Write one region; raises FlashError (transient) or PortError."""

    async def verify(self, region: Region) -> None:
        """Compare the board's MD5 of the region with ours; raises VerifyError."""

    async def reset(self, capture: bool = False) -> None:
        """Hard-reset the board so it boots the new firmware. `capture`: switch the port
        to the console's 115200 before the reset and keep it open for `console()`."""

    async def console(self, timeout: float, enough: Callable[[str], bool]) -> str | None:
        """The board's console at 115200 from the last reset on, once `enough(text)` or
        after `timeout` seconds. Only after `reset(capture=True)`. None: this port cannot
        carry the story (a native-USB port leaves the bus when the chip restarts)."""

    async def close(self) -> None:
        """Release the port; safe to call twice and from a cancelled worker."""

    async def on_loader(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run the blocking `fn(loader)` on the session's thread with its connected
        loader (station/security's eFuse work); errors as `write`'s, naming `what`."""


class Flasher(Protocol):
    """Opens boards; the daemon's only way to reach a serial port."""

    async def open(self, port: str) -> BoardSession:
        """Connect, sync, load the stub, raise the baud; raises PortError/NotAnEspError."""


@dataclass(frozen=True)
class BoardHistory:
    """The board's latest `done` job on another station (from the central ledger)."""

    station: str
    finished_at: float
    thing_name: str | None = None
    certificate_id: str | None = None
    firmware_hash: str | None = None

    def describe(self) -> str:
        import time

        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.finished_at))
        return f"provisioned by {self.station} on {when}"


KnownBoardLookup = Callable[[str], Awaitable[BoardHistory | None]]
"""mac -> the board's history on other stations, or None (unknown, or not asked: the
central ledger is not configured or not reachable; a board never waits on it)."""


SecurityJournal = Callable[[str, str, str, str | None, str | None, str], Awaitable[None]]
"""(step, phase "before"/"after"/"failed", mode, key fingerprint, signing key digest,
detail):
one line of a board's security journal, durable before the call returns."""


class BoardLock(Protocol):
    """One board's security sequence (station/security), as the worker drives it."""

    @property
    def nvs_keys(self) -> bytes | None:
        """The board's NVS encryption keys (its nvs_keys partition holds them, flash-
        encrypted) that its NVS credentials are encrypted with; None: plain NVS."""

    def regions(self, regions: Sequence[Region], own: bool = False) -> list[Region]:
        """The plan's images as this board gets them (signed, encrypted; its nvs_keys
        partition added); `own`: the board's own data partitions, nothing added."""

    def write_last(self, regions: Sequence[Region]) -> tuple[list[Region], list[Region]]:
        """`regions` split into those written first and those written after the board's
        own data (key = "device": the bootloader, so a board stopped before it boots
        nothing)."""

    async def before_write(self, session: BoardSession) -> None:
        """Burn what must be burned before anything is written (the key)."""

    async def verified(self, written: Sequence[Region]) -> None:
        """Right after the verify of `written`: journal what it proves (key = "device":
        the plaintext the first boot encrypts is whole)."""

    async def after_verify(self, session: BoardSession, written: Sequence[Region]) -> None:
        """The images are verified: burn the rest (counter, secure boot, lock-down)."""

    def boot_complete(self, complete: Callable[[str], bool]) -> Callable[[str], bool]:
        """When the boot story is told: key = "device" waits through the first boot
        (the chip encrypts its flash and resets) for the second one."""

    def boot_story(self, text: str) -> str:
        """The boot to judge the firmware by (key = "device": the second)."""

    def boot_problem(self, text: str) -> str | None:
        """What the boot story lacks of the board's new state, or None."""

    async def after_boot(self, text: str) -> None:
        """The boot check passed: journal what only the boot shows (the first boot)."""

    def boot_failure(self, detail: str) -> Exception | None:
        """The error a failed boot check is for this board (a board that cannot be
        written again: needs rework), or None for the usual boot error."""


class BoardDs(Protocol):
    """[credentials] ds: the board's HMAC key burned, its key made DS ciphertext
    (station/dsboard.py)."""

    async def region(self, session: BoardSession, identity: BoardIdentity,
                     creds: DeviceCredentials, block: str, at: tuple[int, int],
                     journal: SecurityJournal) -> tuple[Region, DeviceCredentials]:
        """The board's esp_secure_cert partition and its credentials without a key."""
        ...

    async def check(self, session: BoardSession, identity: BoardIdentity, block: str) -> None:
        """Before anything is written or burned: SecurityError if `block` is used for
        anything but a DS key (the board stays untouched)."""
        ...


class BoardSecurity(Protocol):
    """The station's security part: decides each board's sequence from its eFuses."""

    async def survey(self, session: BoardSession, identity: BoardIdentity,
                     journal: SecurityJournal, thing: str = "") -> BoardLock:
        """Read the eFuses; SecurityError if the board is locked elsewhere or cannot
        be finished."""
