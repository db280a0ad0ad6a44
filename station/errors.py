"""One error tree for everything the station can explain to an operator.

Each error carries the context a person needs to act (port, MAC, stage, file, key) and
says whether retrying could help, so the worker can decide without parsing messages.
"""

from __future__ import annotations


class StationError(Exception):
    """A failure with a message fit for an operator; `transient` means a retry may help."""

    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient


class ConfigError(StationError):
    """station.toml or a file it names is wrong; the message names the file and key."""

    def __init__(self, path: str, key: str | None, reason: str) -> None:
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.key = key
        self.reason = reason


class FirmwareError(ConfigError):
    """The firmware bundle cannot be flashed as configured (headers, chip, sizes, overlap)."""


class StateDirBusyError(StationError):
    """Another station process holds the state directory."""


class PortError(StationError):
    """The serial port could not be opened, vanished, or does not answer like an ESP."""

    transient = True


class NotAnEspError(PortError):
    """Something answers on the port, but not the ESP bootloader protocol."""

    transient = False


class FlashError(StationError):
    """Writing or verifying flash failed."""

    transient = True


class WrongChipError(FlashError):
    """The board's chip is not the one the firmware was built for."""

    transient = False

    def __init__(self, found: str, expected: str | tuple[str, ...]) -> None:
        have = (expected,) if isinstance(expected, str) else expected
        if len(have) == 1:
            message = (f"board is an {found} but the firmware is built for {have[0]}; "
                       "plug a matching board or change [firmware] chip")
        else:
            message = (f"board is an {found} but this station has firmware only for "
                       f"{', '.join(have)}; plug a matching board or add a [[firmware]] "
                       f"entry for {found}")
        super().__init__(message)
        self.found = found
        self.expected = have


class BootError(StationError):
    """The board did not boot what was written (station/flash/bootcheck.py): a retry would
    write the same bytes and boot the same way."""


class VerifyError(FlashError):
    """The MD5 the board reports does not match the image written."""


class RegistrationError(StationError):
    """The cloud (or the local CA) did not register the board."""


class CloudCheckError(StationError):
    """The board's new credentials did not open a session on its broker ([verify] cloud):
    the broker's reason; a retry would present the same certificate."""


class CredentialsError(StationError):
    """Credentials could not be stored or turned into a partition image."""


class LedgerError(StationError):
    """The ledger database is unusable (locked by another process, corrupt)."""


class LedgerLockedError(LedgerError):
    """Another process holds the ledger's write lock past the busy timeout.

    Kin of StateDirBusyError: the fix is to stop the other process, not to edit a file,
    so the CLI gives it the same exit code.
    """


class CentralError(StationError):
    """The central ledger (PostgreSQL) refused the station: credentials, database, schema.

    Fatal at start (a person must act); boards never wait on it once the station runs."""


class CentralUnreachableError(CentralError):
    """PostgreSQL cannot be reached now; the station buffers in its local ledger."""

    transient = True


class KnownBoardError(StationError):
    """[identity] on_known_board = "fail" and another station provisioned the board."""


class SecurityError(StationError):
    """A board cannot be locked as configured: it is locked by another line, or its
    eFuses say a sequence started here cannot be finished. Never retried: an eFuse
    step is not something to try again blindly."""

    def __init__(self, message: str, *, rework: bool = False) -> None:
        super().__init__(("needs rework: " if rework else "") + message, transient=False)
        self.rework = rework
