"""The dashboard rendered into a real fixed-width rich Console, compared as text lines;
headless lines; Live started and stopped on a StringIO console."""

from __future__ import annotations

import io
import threading
from typing import Any

from rich.console import Console

from station.events import (
    BootChecked,
    ButtonsNeeded,
    Event,
    HubStatus,
    Identified,
    JobFinished,
    JobStarted,
    Progress,
    Registered,
    Retrying,
    Stage,
    StageChanged,
    Throttled,
)
from station.screen import HeadlessLog, LiveDashboard, StationView, format_event, render

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def at(slot: str, job: str | None = None) -> dict[str, Any]:
    return {"job_id": job or f"job-{slot}", "port": f"/dev/ttyUSB{slot[1:]}", "slot": slot}


def start(slot: str, t: float, mac: str, job: str | None = None) -> list[Event]:
    w = at(slot, job)
    return [JobStarted(**w, station="line-1", firmware_hash="f", at=t),
            StageChanged(**w, stage=Stage.CONNECT, at=t),
            Identified(**w, chip="esp32", mac=mac, thing_name=f"dev-{mac}", at=t + 1),
            StageChanged(**w, stage=Stage.FLASH, at=t + 2)]


def station_events() -> list[Event]:
    """A1 flashing at 34%, A2 failed at connect, A10 done, A3 throttled in register."""
    return [
        *start("A1", T0, "240ac4000001"),
        Progress(**at("A1"), region="bootloader", done=30_000, total=30_000, at=T0 + 3),
        Progress(**at("A1"), region="app", done=100_000, total=1_470_000, at=T0 + 4),
        Progress(**at("A1"), region="app", done=480_000, total=1_470_000, at=T0 + 5),
        JobStarted(**at("A2"), station="line-1", firmware_hash="f", at=T0),
        Retrying(**at("A2"), stage=Stage.CONNECT, attempt=2, reason="no answer", at=T0 + 5),
        JobFinished(**at("A2"), result=Stage.FAILED, failed_stage=Stage.CONNECT,
                    error="board does not answer\n(check the cable)", at=T0 + 9),
        *start("A10", T0 + 1, "240ac400000a"),
        JobFinished(**at("A10"), result=Stage.DONE, at=T0 + 24.4),
        *start("A3", T0 + 2, "240ac4000003"),
        StageChanged(**at("A3"), stage=Stage.REGISTER, at=T0 + 5),
        Throttled(**at("A3"), api="CreateThing", at=T0 + 6),
    ]


def built_view() -> StationView:
    view = StationView(station="line-1", firmware="demo 1.0 (3f2a)", registrar="aws-iot",
                       started_at=T0 - 60)
    for event in station_events():
        view.apply(event)
    return view


def rendered_lines(view: StationView, now: float, width: int = 140) -> list[str]:
    console = Console(width=width, color_system=None, force_terminal=True, record=True,
                      file=io.StringIO())
    console.print(render(view, now))
    return [line.rstrip() for line in console.export_text().splitlines()]


def row_line(lines: list[str], slot: str) -> str:
    [line] = [line for line in lines if line.split()[:1] == [slot]]
    return line


def test_render_shows_each_slot_stage_progress_and_errors() -> None:
    lines = rendered_lines(built_view(), now=T0 + 30)
    a1 = row_line(lines, "A1")
    for text in ("ttyUSB1", "esp32", "dev-240ac4000001", "flash", "34% 510 kB/1.5 MB",
                 "240 kB/s", "30.0s"):
        assert text in a1, (text, a1)
    a2 = row_line(lines, "A2")
    assert "failed" in a2 and "at connect: board does not answer (check the cable)" in a2
    assert "9.0s" in a2  # a finished row's clock stops
    a10 = row_line(lines, "A10")
    assert "done" in a10 and "23.4s" in a10
    a3 = row_line(lines, "A3")
    assert "register" in a3 and "throttled" in a3
    slots = [line.split()[0] for line in lines if line.split()[:1] and
             line.split()[0] in ("A1", "A2", "A3", "A10")]
    assert slots == ["A1", "A2", "A3", "A10"]  # natural order
    assert lines[-2] == "done 1  failed 1  removed 0  skipped 0  in progress 2  |  40.0 boards/h"
    assert lines[-1] == ("station line-1  |  up 1:30  |  registrar aws-iot  |  "
                         "firmware demo 1.0 (3f2a)")


def test_render_is_a_pure_function_of_state_and_now() -> None:
    view = built_view()
    assert rendered_lines(view, T0 + 30) == rendered_lines(view, T0 + 30)
    assert rendered_lines(view, T0 + 30) != rendered_lines(view, T0 + 31)


def test_finished_row_stays_until_a_new_job_starts_on_its_slot() -> None:
    view = built_view()
    view.apply(JobFinished(**at("A1"), result=Stage.REMOVED, failed_stage=Stage.FLASH,
                           at=T0 + 40))
    assert "removed during flash" in row_line(rendered_lines(view, T0 + 100), "A1")
    view.apply(Progress(**at("A1"), region="app", done=1, total=2, at=T0 + 41))  # late
    view.apply(JobStarted(**at("A1", "next"), station="line-1", firmware_hash="f",
                          at=T0 + 50))
    a1 = row_line(rendered_lines(view, T0 + 60), "A1")
    assert "connect" in a1 and "240ac4000001" not in a1 and "removed" not in a1
    assert view.results["removed"] == 1


def test_retry_resets_progress_and_says_why() -> None:
    view = built_view()
    view.apply(Retrying(**at("A1"), stage=Stage.FLASH, attempt=2, reason="MD5 mismatch",
                        at=T0 + 6))
    row = view.rows["A1"]
    assert row.bytes_done == 0 and row.speed() is None
    assert "attempt 2 after: MD5 mismatch" in row_line(rendered_lines(view, T0 + 7), "A1")


def test_snapshot_is_a_private_copy() -> None:
    view = built_view()
    snap = view.snapshot()
    view.apply(Progress(**at("A1"), region="app", done=1_470_000, total=1_470_000,
                        at=T0 + 6))
    assert snap.rows["A1"].bytes_done == 510_000
    assert view.rows["A1"].bytes_done == 1_500_000
    assert snap.rows["A1"].speed() == 240_000


def headless(events: list[Event]) -> list[str]:
    view = StationView(station="line-1")
    out = io.StringIO()
    log = HeadlessLog(view, out)
    for event in events:
        view.apply(event)  # the Bus calls view.apply before the log, as the CLI wires it
        log.show(event)
    return out.getvalue().splitlines()


def test_headless_one_line_per_event_progress_only_at_edges_and_quarters() -> None:
    w = at("A1")
    progress = [Progress(**w, region="app", done=d, total=1_000_000, at=T0 + 3 + d / 1e6)
                for d in range(0, 1_000_001, 50_000)]
    events = [*start("A1", T0, "240ac4112233"), *progress,
              Registered(**w, thing_name="dev-240ac4112233", certificate_id="c1",
                         registrar="aws-iot", at=T0 + 5),
              JobFinished(**w, result=Stage.DONE, at=T0 + 23.4)]
    lines = headless(events)
    assert lines[0] == "2027-01-15T08:00:00Z A1 /dev/ttyUSB1 - started job job-A1"
    assert lines[2] == ("2027-01-15T08:00:01Z A1 /dev/ttyUSB1 240ac4112233 identified esp32 "
                        "as dev-240ac4112233")
    flash = [line.split(" ", 4)[4] for line in lines if " flash app " in line]
    assert flash == [f"flash app {d}/1000000 B" for d in
                     (0, 250_000, 500_000, 750_000, 1_000_000)]
    assert len(lines) == len(events) - len(progress) + len(flash)
    assert lines[-1] == "2027-01-15T08:00:23Z A1 /dev/ttyUSB1 240ac4112233 done in 23.4s"


def test_headless_failure_is_one_line_naming_the_stage() -> None:
    w = at("B2")
    lines = headless([
        JobStarted(**w, station="s", firmware_hash="f", at=T0),
        Retrying(**w, stage=Stage.CONNECT, attempt=2, reason="timeout", at=T0 + 1),
        JobFinished(**w, result=Stage.FAILED, failed_stage=Stage.CONNECT,
                    error="no ESP on this port:\nwrong device?", at=T0 + 2)])
    assert lines[1].endswith("B2 /dev/ttyUSB2 - retrying connect (attempt 2): timeout")
    assert lines[2].endswith("B2 /dev/ttyUSB2 - failed at connect: no ESP on this port: "
                             "wrong device?")


def test_format_event_is_pure() -> None:
    view = built_view()
    event = StageChanged(**at("A1"), stage=Stage.VERIFY, at=T0 + 7)
    assert format_event(event, view) == format_event(event, view)
    assert view.rows["A1"].stage == Stage.FLASH


def test_live_dashboard_starts_and_stops_on_a_string_console() -> None:
    out = io.StringIO()
    console = Console(file=out, width=140, color_system=None, force_terminal=True)
    view = StationView(station="line-1")
    with LiveDashboard(view, console=console):
        for event in station_events():
            view.apply(event)
    text = out.getvalue()
    assert "A10" in text and "board does not answer" in text and "line-1" in text


def test_rendering_from_another_thread_while_events_arrive() -> None:
    """What Live does: snapshots and renders off the loop thread while apply() runs."""
    view = built_view()
    stop = threading.Event()
    errors: list[BaseException] = []
    renders = 0

    def painter() -> None:
        nonlocal renders
        console = Console(file=io.StringIO(), width=140, color_system=None)
        while not stop.is_set():
            try:
                console.print(render(view.snapshot(), T0 + 30))
                renders += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    thread = threading.Thread(target=painter)
    thread.start()
    try:
        for k in range(20_000):
            view.apply(Progress(**at(f"A{k % 16 + 1}"), region="app", done=k, total=20_000,
                                at=T0 + k / 1000))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive() and not errors and renders > 0


def test_long_port_names_keep_their_end_which_names_the_socket() -> None:
    from station.screen.dashboard import short_port

    assert short_port("/dev/ttyUSB3") == "ttyUSB3"
    long = "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.12:1.0-port0"
    assert short_port(long) == "…-0:1.12:1.0-port0"
    assert len(short_port(long)) == 18


def test_a_dead_hub_the_booted_version_and_a_board_waiting_for_buttons_show() -> None:
    view = built_view()
    url = "rfc2217://hub-2:4001"
    view.apply(HubStatus(job_id="", port=url, slot="H2", state="down",
                         detail="hub-2:4001: Connection refused; retry in 4 s"))
    view.apply(BootChecked(**at("A10"), result="ok", project="blinky", version="2.0.1",
                           detail="", tail="I (310) app_init: App version:      2.0.1"))
    view.apply(JobFinished(**at("A10"), result=Stage.DONE, at=T0 + 25))
    view.apply(ButtonsNeeded(**at("A1"), waiting=True))
    lines = rendered_lines(view, T0 + 30)
    assert f"hub {url} (H2) unreachable: hub-2:4001: Connection refused" in "\n".join(lines)
    assert "done" in row_line(lines, "A10") and "booted blinky 2.0.1" in row_line(lines, "A10")
    assert "press BOOT + EN" in row_line(lines, "A1")
    view.apply(ButtonsNeeded(**at("A1"), waiting=False))
    view.apply(HubStatus(job_id="", port=url, slot="H2", state="present", detail=""))
    lines = rendered_lines(view, T0 + 31)
    assert "press BOOT + EN" not in row_line(lines, "A1")
    assert "unreachable" not in "\n".join(lines)


def test_boards_per_hour_shows_once_a_board_is_done_even_in_the_first_minute() -> None:
    view = StationView(station="line-1", started_at=T0)
    for event in start("A1", T0, "240ac4000001"):
        view.apply(event)
    assert "- boards/h" in rendered_lines(view, T0 + 10)[-2]
    view.apply(JobFinished(**at("A1"), result=Stage.DONE, at=T0 + 20))
    assert rendered_lines(view, T0 + 25)[-2].endswith("  |  144.0 boards/h")


def test_at_80_columns_port_speed_and_baud_give_way_and_the_mac_keeps_its_end() -> None:
    view = built_view()
    view.apply(Registered(**at("A1"), thing_name="widget-pro-240ac4000001",
                          certificate_id="c1", registrar="aws-iot", at=T0 + 5))
    wide, narrow = rendered_lines(view, T0 + 30, 160), rendered_lines(view, T0 + 30, 80)
    assert wide[0].split() == ["slot", "port", "chip", "MAC", "/", "thing", "stage",
                               "elapsed", "speed", "baud", "progress", "/", "result"]
    assert "widget-pro-240ac4000001" in row_line(wide, "A1")
    assert narrow[0].split()[:3] == ["slot", "chip", "MAC"] and "port" not in narrow[0]
    assert max(len(line) for line in narrow) <= 80
    a1 = row_line(narrow, "A1").split()
    assert a1[:4] == ["A1", "esp32", "…240ac4000001", "flash"], a1
    assert "━━━───────" in a1 and "34%" in a1
    assert row_line(narrow, "A3").split()[1:4] == ["esp32", "…240ac4000003", "register"]


def test_the_footer_moves_whole_items_to_the_next_line_where_it_is_narrow() -> None:
    lines = rendered_lines(built_view(), T0 + 30, 60)
    footer = lines[lines.index(row_line(lines, "A10")) + 1:]
    assert footer == ["done 1  failed 1  removed 0  skipped 0  in progress 2",
                      "40.0 boards/h",
                      "station line-1  |  up 1:30  |  registrar aws-iot",
                      "firmware demo 1.0 (3f2a)"]


def test_cut_middle_keeps_the_whole_mac_then_its_last_digits() -> None:
    from rich.text import Text

    from station.screen.fit import cut_middle

    name = Text("widget-pro-240ac4269e0c")
    assert [cut_middle(name, w, tail=12).plain for w in (30, 17, 13, 8, 1)] == [
        "widget-pro-240ac4269e0c", "widg…240ac4269e0c", "…240ac4269e0c", "…4269e0c", "…"]


def test_the_registry_and_cloud_column_and_lines() -> None:
    """[registry] and [verify] cloud: a column on a line that has them, and log lines."""
    from station.events import CloudChecked, RegistryStep

    w = at("A1")
    events = [*start("A1", T0, "240ac4000001"),
              RegistryStep(**w, mac="240ac4000001", thing_name="dev-240ac4000001",
                           step="pending", method="POST", url="https://bodh/api/devices",
                           at=T0 + 2),
              RegistryStep(**w, mac="240ac4000001", thing_name="dev-240ac4000001",
                           step="registered", method="POST", url="https://bodh/api/devices",
                           device_id="d-17", status=201, at=T0 + 3),
              CloudChecked(**w, mode="publish", result="ok", broker="mq:8883",
                           client_id="dev-240ac4000001", at=T0 + 9),
              JobFinished(**w, result=Stage.DONE, at=T0 + 10)]
    view = StationView(station="line-1", registrar="local-ca", registry="bodh",
                       cloud="publish", started_at=T0)
    for event in events:
        view.apply(event)
    lines = rendered_lines(view, T0 + 11)
    assert "registry / cloud" in lines[1] or any("registry / cloud" in x for x in lines[:3])
    assert "reg ✓ d-17 · mqtt ✓" in row_line(lines, "A1")
    assert "registry bodh  |  cloud check publish" in "\n".join(lines)
    plain = StationView(station="line-1", started_at=T0)  # no registry: no column
    assert not any("registry / cloud" in x for x in rendered_lines(plain, T0))
    log = headless(events)
    assert any(x.endswith("registry registered POST https://bodh/api/devices id d-17")
               for x in log), log
    assert any(x.endswith("cloud check publish ok as dev-240ac4000001 at mq:8883")
               for x in log), log


def test_the_security_mark_in_the_result_and_the_journal_lines() -> None:
    """[security]: a board locked shows "locked" before what it booted (at 80 columns too);
    one failed after its key shows how far its irreversible steps went; one burning its
    eFuses says which batch; the headless lines name each batch, the key by its hash."""
    from station.events import SecurityStep

    mode = "flash encryption release (host key), secure boot v2, lock-down"

    def steps(slot: str, t: float, *done: str, under_way: str = "") -> list[Event]:
        w, mac = at(slot), f"240ac40000{slot[1:]:0>2}"
        out: list[Event] = []
        for n, step in enumerate(done):
            fp = "3f1c0a77e2d9b410" if step == "key" else None
            out += [SecurityStep(**w, mac=mac, step=step, phase="before", mode=mode,
                                 fingerprint=fp, detail="XTS_AES_128_KEY", at=t + n),
                    SecurityStep(**w, mac=mac, step=step, phase="after", mode=mode,
                                 fingerprint=fp, detail="BLOCK_KEY0", at=t + n + 0.5)]
        if under_way:
            out.append(SecurityStep(**w, mac=mac, step=under_way, phase="before", mode=mode,
                                    detail="DIS_PAD_JTAG", at=t + 9))
        return out

    all_steps = ("key", "images", "encrypt", "secure_boot", "lockdown")
    events = [*start("A1", T0, "240ac4000001"),
              StageChanged(**at("A1"), stage=Stage.SECURE, at=T0 + 3),
              *steps("A1", T0 + 3, *all_steps),
              BootChecked(**at("A1"), result="ok", project="demo", version="1.0",
                          detail="", tail="", at=T0 + 20),
              JobFinished(**at("A1"), result=Stage.DONE, at=T0 + 21),
              *start("A2", T0, "240ac4000002"),
              *steps("A2", T0 + 3, "key"),
              JobFinished(**at("A2"), result=Stage.FAILED, failed_stage=Stage.FLASH,
                          error="the port went away", at=T0 + 8),
              *start("A3", T0, "240ac4000003"),
              StageChanged(**at("A3"), stage=Stage.SECURE, at=T0 + 3),
              *steps("A3", T0 + 3, *all_steps[:4], under_way="lockdown")]
    view = StationView(station="line-1", started_at=T0)
    for event in events:
        view.apply(event)
    for width in (140, 80):
        lines = rendered_lines(view, T0 + 22, width)
        assert max(len(line) for line in lines) <= width
        assert "locked · booted demo 1.0" in row_line(lines, "A1"), lines
        assert "key burned · at flash: the port went away" in row_line(lines, "A2"), lines
        assert "eFuses: lockdown before" in row_line(lines, "A3"), lines
        assert "secure" in row_line(lines, "A3").split()
    log = headless(events)
    assert any(x.endswith("240ac4000001 security key after key 3f1c0a77e2d9b410: "
                          "BLOCK_KEY0") for x in log), log
    assert any(x.endswith("240ac4000003 security lockdown before: DIS_PAD_JTAG")
               for x in log), log
    assert not any("SecurityStep" in x for x in log)
