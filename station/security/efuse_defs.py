"""espefuse's eFuse table for a chip, parsed once per process instead of once per board.

Every espefuse view of a board (``EspEfuses`` in ``espefuse/efuse/<chip>/fields.py``,
and the simulator's ``EmulateEfuseController``) builds ``EfuseDefineFields(None)``,
which parses the chip's table (``espefuse/efuse_defs/<chip>.yaml``) with PyYAML's
pure-Python loader: 40 ms (ESP32) to 180 ms (ESP32-S3) of CPU per board, a third of
what a locking station's security costs in CPU (BENCHMARKS.md "Locking boards"). The
table is the same for every board of a chip, so each view gets a deep copy of one
parsed table (0.5-1.4 ms): the objects espefuse builds are espefuse's own, from its
own definitions; only the name its module looks up is rebound. A custom table
(``extend_efuse_table``) is parsed as espefuse does it.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from typing import Any


def espefuse_module(name: str) -> Any:
    """Import part of espefuse; its package imports click's ``OptionParser``, which
    click 8.2 deprecates noisily."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(f"espefuse.{name}")


def parse_once(module: Any) -> None:
    """Rebind ``module.EfuseDefineFields`` (a chip's ``fields`` or emulator module) to
    hand out copies of one parsed table. Idempotent."""
    make = getattr(module, "EfuseDefineFields", None)
    if make is None or getattr(make, "parsed_once", False):
        return
    table = make(None)

    def fields(extend_efuse_table: Any) -> Any:
        if extend_efuse_table is not None:
            return make(extend_efuse_table)
        return copy.deepcopy(table)

    fields.parsed_once = True  # type: ignore[attr-defined]
    module.EfuseDefineFields = fields


def parse_once_for(chip: str) -> None:
    """The station's espefuse views of `chip` ("esp32s3") share one parsed table."""
    parse_once(espefuse_module(f"efuse.{chip}.fields"))
