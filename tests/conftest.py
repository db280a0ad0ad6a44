"""Fixtures most station tests share: the demo firmware, a site (station.toml, state,
hub folder), a quick rig, a tmux terminal. A module that needs another kind defines its
own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from station.sim import Rig
from tests.test_bad_inputs import Firmware, Site, make_firmware, quick_rig
from tests.tmuxkit import Tmux


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Firmware:
    return make_firmware(tmp_path_factory.mktemp("firmware"))


@pytest.fixture
def site(tmp_path: Path, firmware: Firmware) -> Site:
    return Site(tmp_path, firmware)


@pytest.fixture
def rig(site: Site) -> Iterator[Rig]:
    with quick_rig(site) as r:
        yield r


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    """A tmux server of the test's own (tests/tmuxkit.py), killed after the test."""
    t = Tmux()
    yield t
    t.close()
