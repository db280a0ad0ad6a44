"""The flasher against virtual boards: real esptool, real ptys, no mocks."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from station.config import FirmwareSection
from station.demo import make_demo_firmware
from station.errors import (
    FlashError,
    NotAnEspError,
    PortError,
    StationError,
    VerifyError,
    WrongChipError,
)
from station.flash import EsptoolFlasher, EsptoolSession, FirmwareBundle, load_firmware
from station.parts import Region
from station.sim import Rig
from station.sim.faults import Faults

pytestmark = pytest.mark.timeout(180)

CHIPS = ("esp32", "esp32s3", "esp32c3")
STEP = 60.0  # generous bound for any one flasher call on an unthrottled board
T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = STEP) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "hub", seed=11, throttle=False, flash_timing=False) as r:
        yield r


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FirmwareBundle]:
    out = {}
    for chip in CHIPS:
        args = make_demo_firmware(tmp_path_factory.mktemp(chip), chip=chip, app_size=400_000)
        out[chip] = load_firmware(FirmwareSection(chip=chip, flasher_args=args,  # type: ignore
                                                  images=()))
    return out


def flasher_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("flash-")}


async def flash_all(session: EsptoolSession, regions: tuple[Region, ...] | list[Region],
                    ) -> dict[str, list[tuple[int, int]]]:
    seen: dict[str, list[tuple[int, int]]] = {}
    for region in regions:
        calls = seen.setdefault(region.name, [])
        await session.write(region, lambda done, total, calls=calls: calls.append((done, total)))
    for region in regions:
        await session.verify(region)
    return seen


# -- the happy path -------------------------------------------------------------------------


@pytest.mark.parametrize("chip", CHIPS)
def test_open_identify_write_verify(rig: Rig, bundles: dict[str, FirmwareBundle], chip: str,
                                    capfd: pytest.CaptureFixture[str]) -> None:
    board = rig.plug(chip=chip)
    bundle = bundles[chip]
    loop_thread = threading.get_ident()
    threads_seen: set[int] = set()

    async def scenario() -> dict[str, list[tuple[int, int]]]:
        session = await EsptoolFlasher(baud=921600, chip=chip).open(board.port)
        try:
            identity = await session.identify()
            assert identity.chip == chip
            assert identity.mac == board.mac.replace(":", "")
            assert identity.flash_size == 4 << 20

            def track(done: int, total: int) -> None:
                threads_seen.add(threading.get_ident())

            seen = await flash_all(session, bundle.regions)
            await session.write(bundle.regions[0], track)
            await session.reset()
        finally:
            await session.close()
        with pytest.raises(PortError):
            await session.verify(bundle.regions[0])
        return seen

    seen = run(scenario())
    assert threads_seen == {loop_thread}  # progress arrives on the event loop thread
    for region in bundle.regions:
        calls = seen[region.name]
        total = len(region.data)
        assert calls[0] == (0, total) and calls[-1] == (total, total)
        dones = [d for d, _ in calls]
        assert dones == sorted(dones) and all(t == total for _, t in calls)
    image = rig.flash(board)
    for region in bundle.regions:
        assert image[region.offset:region.end] == region.data, region.name
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""  # esptool's chatter goes to logging, not stdout


def test_incompressible_region_is_written_raw(rig: Rig) -> None:
    board = rig.plug(chip="esp32")
    noise = Region.build("noise", 0x200000, random.Random(5).randbytes(70_001))
    assert len(noise.compressed) >= len(noise.data)  # so write() sends FLASH_DATA

    async def scenario() -> list[tuple[int, int]]:
        calls: list[tuple[int, int]] = []
        session = await EsptoolFlasher(baud=460800).open(board.port)
        try:
            await session.write(noise, lambda d, t: calls.append((d, t)))
            await session.verify(noise)
        finally:
            await session.close()
        return calls

    calls = run(scenario())
    assert calls[-1] == (len(noise.data), len(noise.data))
    image = rig.flash(board)
    assert image[noise.offset:noise.end] == noise.data
    assert image[noise.end:noise.end + 16] == b"\xff" * 16  # the padded block tail is 0xff


def test_verify_mismatch_names_port_region_offset_and_digests(rig: Rig) -> None:
    board = rig.plug(chip="esp32")
    written = Region.build("app", 0x20000, b"\x11" * 8192)
    expected = Region.build("app", 0x20000, b"\x22" * 8192)
    untouched = Region.build("spare", 0x300000, b"\x33" * 4096)

    async def scenario() -> tuple[VerifyError, VerifyError]:
        session = await EsptoolFlasher(baud=921600).open(board.port)
        try:
            await session.write(written, lambda d, t: None)
            await session.verify(written)
            with pytest.raises(VerifyError) as wrong:
                await session.verify(expected)
            with pytest.raises(VerifyError) as erased:
                await session.verify(untouched)
            return wrong.value, erased.value
        finally:
            await session.close()

    wrong, erased = run(scenario())
    text = str(wrong)
    assert board.port in text and "app" in text and "0x20000" in text
    assert expected.md5 in text and hashlib.md5(written.data).hexdigest() in text
    assert wrong.transient
    assert "erased" in str(erased)


def test_sixteen_boards_in_parallel(rig: Rig, bundles: dict[str, FirmwareBundle]) -> None:
    boards = [rig.plug(chip="esp32") for _ in range(16)]
    bundle = bundles["esp32"]
    flasher = EsptoolFlasher(baud=921600, chip="esp32")
    names: set[str] = set()

    async def one(port: str) -> str:
        session = await flasher.open(port)
        try:
            identity = await session.identify()
            names.update(flasher_threads())
            await flash_all(session, bundle.regions)
            await session.reset()
            return identity.mac
        finally:
            await session.close()

    async def everything() -> list[str]:
        return await asyncio.gather(*(one(b.port) for b in boards))

    macs = run(everything(), timeout=150)
    assert sorted(macs) == sorted(b.mac.replace(":", "") for b in boards)
    assert len(names) >= 2  # one thread per board, not a shared pool
    for board in boards:
        image = rig.flash(board)
        for region in bundle.regions:
            assert image[region.offset:region.end] == region.data
    deadline = time.monotonic() + 10
    while flasher_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not flasher_threads()


# -- boards that are not right ---------------------------------------------------------------


def test_wrong_chip_opens_identifies_and_refuses_to_write(rig: Rig,
                                                          bundles: dict[str, FirmwareBundle]
                                                          ) -> None:
    board = rig.plug(chip="esp32s3")

    async def scenario() -> None:
        session = await EsptoolFlasher(baud=921600, chip="esp32").open(board.port)
        try:
            identity = await session.identify()
            assert (identity.chip, identity.mac) == ("esp32s3", board.mac.replace(":", ""))
            with pytest.raises(WrongChipError) as info:
                await session.write(bundles["esp32"].regions[0], lambda d, t: None)
            assert "esp32s3" in str(info.value) and "esp32" in str(info.value)
        finally:
            await session.close()

    run(scenario())


def test_not_an_esp(rig: Rig) -> None:
    board = rig.plug(chip="esp32", faults=Faults(garbage=True))
    started = time.monotonic()
    with pytest.raises(NotAnEspError) as info:
        run(EsptoolFlasher(baud=921600, connect_attempts=2).open(board.port))
    assert time.monotonic() - started < 20
    assert board.port in str(info.value) and not info.value.transient


def test_mute_board_is_a_port_error_within_the_attempts(rig: Rig) -> None:
    board = rig.plug(chip="esp32", faults=Faults(mute=True))
    started = time.monotonic()
    with pytest.raises(PortError) as info:
        run(EsptoolFlasher(baud=921600, connect_attempts=2).open(board.port))
    assert type(info.value) is PortError and info.value.transient
    assert board.port in str(info.value)
    assert time.monotonic() - started < 10  # 2 attempts of 5 syncs at 0.1 s each
    assert _threads_end()


def test_missing_port(tmp_path: Path) -> None:
    with pytest.raises(PortError, match="cannot open"):
        run(EsptoolFlasher().open(str(tmp_path / "ttyUSB9")))


def test_unplug_mid_write_fails_promptly(rig: Rig, bundles: dict[str, FirmwareBundle]) -> None:
    board = rig.plug(chip="esp32", faults=Faults(unplug_after=150_000))
    app = bundles["esp32"].regions[-1]

    async def scenario() -> list[tuple[int, int]]:
        calls: list[tuple[int, int]] = []
        session = await EsptoolFlasher(baud=921600).open(board.port)
        try:
            await session.write(app, lambda d, t: calls.append((d, t)))
        finally:
            await session.close()
        return calls

    started = time.monotonic()
    with pytest.raises((PortError, FlashError)) as info:
        run(scenario(), timeout=30)
    assert time.monotonic() - started < 15
    assert info.value.transient and board.port in str(info.value)


def test_corrupted_line_fails_with_a_transient_error_or_verifies(
        rig: Rig, bundles: dict[str, FirmwareBundle]) -> None:
    board = rig.plug(chip="esp32", faults=Faults(corrupt=0.02))
    bundle = bundles["esp32"]

    async def scenario() -> None:
        session = await EsptoolFlasher(baud=921600, connect_attempts=3).open(board.port)
        try:
            await flash_all(session, bundle.regions)
        finally:
            await session.close()

    started = time.monotonic()
    try:
        run(scenario(), timeout=90)
    except StationError as e:  # noise may end anywhere, but never in a hang or a crash
        assert isinstance(e, PortError | FlashError), repr(e)
        assert board.port in str(e)
    else:  # the retries may also carry it through: then the flash must be right
        image = rig.flash(board)
        for region in bundle.regions:
            assert image[region.offset:region.end] == region.data
    assert time.monotonic() - started < 90


# -- cancellation and close ---------------------------------------------------------------------


def test_cancel_mid_write_then_close_is_prompt_and_port_reusable(
        tmp_path: Path, bundles: dict[str, FirmwareBundle]) -> None:
    # a throttled board, so the write is still running when it is cancelled
    with Rig(tmp_path / "hub", seed=3, throttle=True, flash_timing=False) as rig:
        board = rig.plug(chip="esp32")
        app = bundles["esp32"].regions[-1]
        flasher = EsptoolFlasher(baud=115200)  # ~3.5 s for this app: plenty of time

        async def scenario() -> float:
            session = await flasher.open(board.port)
            started = asyncio.Event()

            def progress(done: int, total: int) -> None:
                if done > 0:
                    started.set()

            task = asyncio.create_task(session.write(app, progress))
            await asyncio.wait_for(started.wait(), 20)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            t0 = time.monotonic()
            await session.close()
            await session.close()  # idempotent
            took = time.monotonic() - t0
            # the port is free again: a new session opens it and writes a small region
            again = await flasher.open(board.port)
            try:
                small = Region.build("small", 0x300000, b"\x5a" * 1000)
                await again.write(small, lambda d, t: None)
                await again.verify(small)
            finally:
                await again.close()
            return took

        took = run(scenario(), timeout=60)
        assert took < 2.0
        assert _threads_end()


def test_cancelled_open_releases_the_port(rig: Rig) -> None:
    board = rig.plug(chip="esp32", faults=Faults(mute=True))

    async def scenario() -> None:
        task = asyncio.create_task(EsptoolFlasher(connect_attempts=20).open(board.port))
        deadline = time.monotonic() + 10  # until esptool is in its sync loop
        while rig.board(board).bytes_received == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert rig.board(board).bytes_received > 0
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 2.0

    run(scenario())
    assert _threads_end()


def _threads_end(timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while flasher_threads():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.slow
@pytest.mark.timing
def test_sixteen_throttled_boards_keep_up_with_the_line(tmp_path: Path,
                                                         bundles: dict[str, FirmwareBundle]
                                                         ) -> None:
    """At 921600 baud the write is bound by the wire, not by our CPU, even with 16 boards
    on two cores: each board's write takes about compressed bytes * 10 / baud plus the
    flash model's erase and program time."""
    bundle = bundles["esp32"]
    baud = 921600
    wire = bundle.compressed_bytes * 10 / baud
    with Rig(tmp_path / "hub", seed=5, throttle=True, flash_timing=True) as rig:
        boards = [rig.plug(chip="esp32") for _ in range(16)]
        flasher = EsptoolFlasher(baud=baud, chip="esp32")

        async def one(port: str) -> float:
            session = await flasher.open(port)
            try:
                started = time.monotonic()
                await flash_all(session, bundle.regions)
                return time.monotonic() - started
            finally:
                await session.close()

        async def everything() -> list[float]:
            return await asyncio.gather(*(one(b.port) for b in boards))

        took = run(everything(), timeout=120)
    assert max(took) < 2 * wire + 3.0, (wire, took)


def test_a_mac_misread_on_a_noisy_line_is_a_transient_error_not_another_board() -> None:
    from station.errors import PortError
    from station.flash import EsptoolFlasher

    class Noisy:  # READ_REG replies have no checksum: a flipped bit is another MAC
        IS_STUB = False
        secure_download_mode = False
        CHIP_NAME = "ESP32"

        def __init__(self) -> None:
            self.reads = [b"\x24\x0a\xc4\x7e\x0e\xb0", b"\x24\x0a\xc4\x7e\x0a\xb0"]

        def read_mac(self) -> tuple[int, ...]:
            return tuple(self.reads.pop(0))

    session = EsptoolSession("/dev/ttyNOISY", EsptoolFlasher(baud=921600, chip="esp32"))
    try:
        session.esp = Noisy()
        with pytest.raises(PortError, match="MAC read back as 240ac47e0eb0, then as "
                                            "240ac47e0ab0") as caught:
            session._identify_blocking()
        assert caught.value.transient
    finally:
        run(session.close())
