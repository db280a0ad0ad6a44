"""Virtual ESP32 boards that the real, unmodified esptool flashes over real ptys.

A virtual board is a pseudo-terminal plus an asyncio task that answers the ESP serial
bootloader protocol as the ROM of any ESP32-family chip esptool 5.6 knows does, and, after
esptool uploads its flasher stub, as that stub does. It has a NOR flash model, a
line-rate model (the baud rate the host sets on the pty, 10 bits per byte), a flash
timing model, and fault injection. Nothing outside ``station.sim`` may import it
except the CLI, demo, tests and benchmarks: the station must not be able to tell a
virtual board from a real one. See ``docs/virtual-boards.md``.

Python API::

    from station.sim import Rig, Faults

    with Rig("/tmp/hub", seed=1, throttle=False, flash_timing=False) as rig:
        board = rig.plug(chip="esp32")            # -> PluggedBoard
        # esptool --port board.port write-flash 0x10000 app.bin
        image = rig.flash(board)                  # bytes of the whole flash
        rig.unplug(board)                         # link gone, flash dumped
        bad = rig.plug(chip="esp32c3", faults=Faults(mute=True))
        native = rig.plug(chip="esp32s3", usb="jtag")  # re-enumerates on resets
        old = rig.plug(chip="esp32c6", preloaded=True)  # old firmware: pays erases

        remote = rig.plug(chip="esp32", rfc2217_port=0)  # + RFC 2217 face, reset circuit
        # esptool --port remote.rfc2217 write-flash ...; the board then boots:
        rig.console(remote)                       # ROM banner, bootloader, app lines

``PluggedBoard`` has ``index``, ``port`` (the by-path symlink), ``pty`` (the slave
device), ``mac`` ("24:0a:c4:.."), ``chip``, ``dump_path``, ``faults``, ``usb``,
``bridge``, ``vid_pid``, ``max_baud``, ``preloaded``, ``stub_model``, ``rfc2217``,
``reset_circuit``, ``app_line`` and ``en_cap_uf``; ``Rig(..., persist=True)`` lets
boards continue from an earlier run's files in the directory; ``Rig`` also has ``info``,
``replug``, ``resets``, ``reset_count``, ``reenumerations``, ``press_boot_en``,
``press_en`` and ``console``.

Command line: ``python -m station.sim --boards 16 --dir /tmp/hub`` (or ``station sim``);
see :mod:`station.sim.cli`.
"""

from .bridge import BRIDGES
from .chips import CHIP_NAMES, ChipName, parse_chip_list
from .faults import Faults, parse_fault_spec, parse_fault_specs
from .plugged import PluggedBoard, by_path_name, parse_size
from .reset_circuit import RESET_CIRCUITS
from .rig import Rig
from .stub_model import STUB_MODELS
from .usb import USB_KINDS

__all__ = [
    "BRIDGES",
    "CHIP_NAMES",
    "ChipName",
    "Faults",
    "PluggedBoard",
    "RESET_CIRCUITS",
    "Rig",
    "STUB_MODELS",
    "USB_KINDS",
    "by_path_name",
    "parse_chip_list",
    "parse_fault_spec",
    "parse_fault_specs",
    "parse_size",
]
