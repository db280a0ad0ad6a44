"""Reading one table of station.toml: typed getters whose errors name file and key.

Every section parser (reader.py, ports.py) reads through a `Table`, so a wrong
type, a number below its minimum or a misspelt key fails the same way: one line naming
the file, the dotted key and the reason. `done()` turns any key nobody read into an
error: a misspelt key silently ignored is a rig that does something else overnight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, cast

from station.errors import ConfigError

T = TypeVar("T")


class Table:
    """Reads one TOML table, checking types, and complains about keys nobody read."""

    def __init__(self, file: Path, prefix: str, data: Any) -> None:
        self.file, self.prefix = file, prefix
        if not isinstance(data, dict):
            raise ConfigError(str(file), prefix, "must be a table")
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(str(self.file), f"{self.prefix}.{key}" if self.prefix else key, reason)

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"must be {names}, not {type(value).__name__} {value!r}")
        return cast(T, value)

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = float(self.get(key, (int, float), default))
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        return value

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.get(key, int, default)
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def path(self, key: str, default: Path) -> Path:
        raw = self.get(key, str, str(default))
        return self.resolve(raw)

    def resolve(self, raw: str) -> Path:
        p = Path(raw).expanduser()
        return p if p.is_absolute() else self.file.parent / p

    def sub(self, key: str) -> Table:
        return Table(self.file, f"{self.prefix}.{key}" if self.prefix else key,
                      self.get(key, dict, {}))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key (check the spelling; see README)")
