"""Connecting on a key = "device" line without cutting a board's first boot short.

On such a line the bootloader makes the flash-encryption key and encrypts the flash in
place on the board's first boot (ESP-IDF `bootloader_support/src/flash_encryption/
flash_encrypt.c` `encrypt_flash_contents`: the key burned, then `esp_flash_encrypt_region`
rewrites the bootloader, the partition table and each partition sector by sector, then
CRYPT_CNT is burned and it logs "Flash encryption completed"). Espressif warns the pass
must not be interrupted: a reset once the bootloader's first sector is rewritten leaves
ciphertext the ROM cannot read with the counter unset (`bootloader_utility.c`
`load_image`: "Only solution is to reflash with all plaintext", which a burned key
forbids). Any wake with GPIO0 high starts that pass on a board whose plaintext is on the
flash, and esptool's default reset sequence makes one: its first attempt holds GPIO0 low
for only 0.05 s after EN's release (`loader._construct_reset_strategy_sequence`:
`DEFAULT_RESET_DELAY`, then +0.5 s), so a devkit whose EN capacitor is 10 uF (EN crosses
its threshold 139 ms after release; Espressif asks for 1-10 uF, ESP32 Hardware Design
Guidelines) boots from flash, and the second attempt, a second later, resets it in the
middle of the pass. A station restarted after a stop once the plaintext was verified did
exactly that (tests/test_security_device_crash.py).

So on such a line the connect owns the resets:

- **Listen first.** Before the first reset the port is read without touching DTR/RTS
  (opening it asserts both, which the devkit's two-transistor circuit ignores). A boot
  printing the pass's lines is waited out.
- **The long delay first.** esptool's own strategies, longest `reset_delay` first: GPIO0
  low 0.55 s after EN's release covers EN's RC delay for any capacitor Espressif allows,
  so the first attempt enters download mode (the short one stays, as esptool's second).
- **Never reset a pass under way.** After each reset the ROM's banner is read (esptool's
  `_connect_attempt` pattern, `boot:0x..` and `waiting for download`). A board that
  booted from flash anyway is listened to: once it prints a line of the pass (below, ESP-
  IDF's own words), nothing resets it until "Flash encryption completed" (or an error of
  the pass), within `wait_s` (the line's boot timeout, which the station requires to cover
  ~15 s per MB: station/security/setup.py). A pass that does not end in time is reported,
  not reset.

What listening cannot hear: a pass that printed its lines before the port was opened
and is now silent inside a large region (ESP-IDF logs nothing while a region is
rewritten: 1 MB takes 11-14 s in its sample logs). The ledger knows of those: a board
whose job the last stop interrupted after "first_boot before" is waited out
(`under_way`, `wait_out`) whatever the console says. Closing the port is not a reset:
Linux lowers DTR and RTS together on close (`tty_port_shutdown` with HUPCL), which the
circuit ignores, so a killed station leaves the board running whatever it ran.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from esptool.util import FatalError

from station.errors import PortError

log = logging.getLogger("station.flasher")

# ESP-IDF flash_encrypt.c's lines of the pass (check_and_generate_encryption_keys,
# encrypt_bootloader, encrypt_and_load_partition_table, encrypt_partition, and
# encrypt_flash_contents in release mode), in the order it prints them
PASS_LINES = ("Generating new flash encryption key", "Using pre-loaded flash encryption key",
              "bootloader encrypted successfully", "partition table encrypted and loaded",
              "Encrypting partition", "Done encrypting", "Setting CRYPT_CNT for permanent")
COMPLETED = "Flash encryption completed"  # encrypt_flash_contents, after the counter burn
FAILED = re.compile(r"E \(\d+\) flash_encrypt:")  # the pass gave up: nothing left to cut
BANNER = re.compile(r"boot:(0x[0-9a-fA-F]+)")  # esptool's _connect_attempt (and below)
DOWNLOAD = "waiting for download"
QUIET_S = 0.3  # a boot that prints nothing for this long is not printing its pass
BANNER_WAIT_S = 0.5  # after the reset returned: the chip wakes within EN's RC delay
BOOT_WATCH_S = 1.5  # a flash boot that showed no pass line by then is not doing one
READ_SLICE = 0.05


class FirstBootGuard:
    """The resets of one connect on a key = "device" line (see the module docstring)."""

    def __init__(self, port: Any, name: str, wait_s: float, remote: bool) -> None:
        self.port = port
        self.name = name
        self.wait_s = wait_s
        self.remote = remote  # RFC 2217: no input flush (esptool: "might block")

    def reset_into_download(self, strategies: Sequence[Callable[[], None]],
                            attempts: int, under_way: bool = False) -> None:
        """Reset until the ROM says it waits for download, or until a reset whose console
        says nothing readable (esptool's syncs then decide); a board that booted from flash
        is left alone until any first-boot pass it runs has ended. `under_way`: the last
        stop caught this board in its first boot (`wait_out`)."""
        if under_way:
            self.wait_out()
        else:
            self._settle("")  # listen before the first reset
        order = sorted(strategies, key=lambda s: -float(getattr(s, "reset_delay", 0.0)))
        mode = ""
        for _, reset in zip(range(max(1, attempts)), itertools.cycle(order)):
            if not self.remote:
                self.port.reset_input_buffer()
            reset()
            text, download = self._banner()
            if download is not False:
                return
            found = BANNER.search(text)
            mode = found.group(1) if found else "?"
            log.info("%s: the reset booted the chip from flash (boot:%s); listening before "
                     "the next one", self.name, mode)
            self._settle(text)
        raise FatalError(f"Failed to connect to ESP: Wrong boot mode detected ({mode})! "
                         "The chip needs to be in download mode.")

    def wait_out(self) -> None:
        """The last stop came during this board's first boot (its job's last journal line
        is "first_boot before"): the pass may be running, silent inside a region, so
        silence proves nothing. No reset until it prints "Flash encryption completed" (or
        an error), or until `wait_s` has passed: the boot timeout covers a whole pass, and
        this one began before the station did."""
        log.warning("%s: the last stop came during this board's first boot; waiting up to "
                    "%g s for its encryption pass before any reset", self.name, self.wait_s)
        text, deadline = "", time.monotonic() + self.wait_s
        while time.monotonic() < deadline and COMPLETED not in text \
                and not FAILED.search(text):
            text += self._read(READ_SLICE)

    def _read(self, seconds: float) -> str:
        port, deadline, data = self.port, time.monotonic() + seconds, bytearray()
        saved, port.timeout = port.timeout, READ_SLICE
        try:
            while time.monotonic() < deadline:
                chunk = port.read(max(1, port.in_waiting))
                data += chunk
                if not chunk:
                    break
        finally:
            port.timeout = saved
        return data.decode("ascii", "replace")

    def _banner(self) -> tuple[str, bool | None]:
        """The ROM's boot line after a reset: True download mode, False a flash boot,
        None nothing readable (a console at another rate, a mute board)."""
        text, deadline = "", time.monotonic() + BANNER_WAIT_S
        while time.monotonic() < deadline:
            more = self._read(READ_SLICE)
            text += more
            if DOWNLOAD in text:
                return text, True
            found = BANNER.search(text)
            if found and (text.count("\n", found.end()) >= 2 or not more):
                return text, False  # its next line is not "waiting for download"
        return text, None

    def _settle(self, text: str) -> None:
        """Read on until the console shows no first-boot pass under way: quiet, or past
        the point where the pass would print, or the pass ended. Raises if a pass still
        runs after `wait_s` (resetting it then would cost the board)."""
        start = last = time.monotonic()
        told = False
        while True:
            if COMPLETED in text or FAILED.search(text):
                return
            now = time.monotonic()
            if any(line in text for line in PASS_LINES):
                if now - start > self.wait_s:
                    raise PortError(f"{self.name}: the board's first boot is still "
                                    f"encrypting its flash after {self.wait_s:g} s; not "
                                    "resetting it (that would cost the board)",
                                    transient=False)
            elif now - last > QUIET_S or now - start > BOOT_WATCH_S:
                return
            more = self._read(READ_SLICE)
            if more:
                last = time.monotonic()
                if not text:
                    log.info("%s: the board is printing a boot; listening before any reset",
                             self.name)
                if not told and any(line in text + more for line in PASS_LINES):
                    told = True
                    log.warning("%s: the board's first boot is encrypting its flash; no "
                                "reset until it completes", self.name)
            text += more
