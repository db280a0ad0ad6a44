"""Fixtures most station tests share: the demo firmware, a site (station.toml, state,
hub folder), a quick rig, a tmux terminal. A module that needs another kind defines its
own."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from station.sim import Rig
from tests.test_bad_inputs import Firmware, Site, make_firmware, quick_rig
from tests.tmuxkit import Tmux


@pytest.hookimpl(trylast=True)  # after `-m` has deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each xdist worker starts with its share of the longest tests. `make test` runs
    `--dist worksteal`, which hands worker k the k-th of n even, consecutive slices of
    the collection and lets idle workers take from the others' queues: so the long
    tests (`long`, over 20 s) are dealt round-robin to the slices' heads, the busy ones
    (`long(cpu=True)`: 16 boards at once) alternating with those that mostly wait. A
    minute-long test collected last would otherwise start when the rest is done."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return

    def cpu(item: pytest.Item) -> bool:
        mark = item.get_closest_marker("long")
        return mark is not None and bool(mark.kwargs.get("cpu"))
    long = [item for item in items if item.get_closest_marker("long")]
    rest = [item for item in items if not item.get_closest_marker("long")]
    dealt = [item for pair in itertools.zip_longest([i for i in long if not cpu(i)],
                                                    [i for i in long if cpu(i)])
             for item in pair if item is not None]
    ordered: list[pytest.Item] = []
    left = len(items)
    for k in range(workers):  # worksteal's slices: len(pending) // nodes_remaining
        size = left // (workers - k)
        heads = dealt[k::workers]
        ordered += heads + rest[:size - len(heads)]
        rest = rest[size - len(heads):]
        left -= size
    items[:] = ordered + rest


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
