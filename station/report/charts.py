"""The night report's charts: matplotlib figures as inline SVG text.

Why it looks like this:
- The report is one file a factory PC opens with no network, so charts are SVG inside the
  HTML, drawn by matplotlib (a kept library, not hand-made SVG) on the Agg backend (no
  display). Text is drawn as glyph paths (`svg.fonttype = "path"`): no font has to be
  installed or fetched where the file is opened.
- Several SVGs in one page share one id namespace, and matplotlib names glyphs and clip
  paths the same way in every figure; each chart's ids get a prefix of their own so a
  `<use href="#...">` of one chart never resolves into another.
- Fixed `svg.hashsalt` and no date in the metadata: the same ledger gives the same file.
- The slot map is laid out like the hub: a slot label ending in a number (A3, usb-0:1.3)
  puts the number in the column and the rest in the row, so A1..A8 / B1..B8 come out as
  the two rows of the rack and a 16-port hub's 1..16 as two rows of eight.
"""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on a station or in CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from station.report.stats import Stats  # noqa: E402

GREEN, RED, AMBER, GREY = "#2e7d32", "#c62828", "#f9a825", "#9e9e9e"
COLUMNS = 8  # a slot map row at most; a 16-port hub is two rows of eight
_RC: Any = {"svg.fonttype": "path", "svg.hashsalt": "station-report", "font.size": 9,
       "axes.spines.top": False, "axes.spines.right": False}


def svg(fig: Figure, prefix: str) -> str:
    """`fig` as an `<svg>` element (no XML prolog) whose ids all start with `prefix`."""
    out = io.StringIO()
    fig.savefig(out, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = out.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # RDF, creator URL
    return re.sub(r'(id="|href="#|url\(#)', lambda m: f"{m.group(1)}{prefix}-", text)


def _clock(at: float, seconds: bool) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S" if seconds else "%H:%M")


def timeline(stats: Stats) -> str:
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(9, 2.8))
        starts = [t for t, *_ in stats.timeline]
        done = [d for _, d, _, _ in stats.timeline]
        failed = [f for _, _, f, _ in stats.timeline]
        removed = [r for *_, r in stats.timeline]
        x = range(len(starts))
        ax.bar(x, done, color=GREEN, label="done")
        ax.bar(x, failed, bottom=done, color=RED, label="failed")
        ax.bar(x, removed, bottom=[d + f for d, f in zip(done, failed, strict=True)],
               color=AMBER, label="removed")
        width = stats.bucket_s
        step = max(1, len(starts) // 12)
        ax.set_xticks(list(x)[::step], [_clock(t, width < 60) for t in starts][::step])
        per = "hour" if width == 3600 else f"{width // 60} min" if width >= 60 else \
            f"{width} s"
        ax.set_ylabel(f"boards per {per}")
        ax.set_xlabel("bar: boards that ended in it, from the time under it (UTC)")
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, ncols=3)
        return svg(fig, "timeline")


def stage_times(stats: Stats) -> str:
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(9, 2.8))
        stages = list(stats.stage_times)
        ax.boxplot([stats.stage_times[s] for s in stages], orientation="horizontal",
                   tick_labels=stages, showfliers=True, widths=0.6,
                   medianprops={"color": RED}, flierprops={"markersize": 3})
        ax.invert_yaxis()
        ax.set_xlabel("seconds per stage, boards done")
        return svg(fig, "stages")


def failures_by_stage(stats: Stats) -> str:
    with plt.rc_context(_RC):
        items = sorted(stats.failures_by_stage.items(), key=lambda kv: -kv[1])
        fig, ax = plt.subplots(figsize=(4.4, 0.9 + 0.35 * len(items)))
        ax.barh([k for k, _ in items], [v for _, v in items], color=RED, height=0.6)
        ax.invert_yaxis()
        ax.set_xlabel("boards failed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return svg(fig, "failstage")


def hub_layout(slots: list[str]) -> dict[str, tuple[int, int]]:
    """slot -> (row, column) on the map, like the hub (see the module's docstring)."""
    parsed = [re.fullmatch(r"(.*?)(\d+)", s) for s in slots]
    cells: dict[str, tuple[int, int]] = {}
    if slots and all(parsed):
        prefixes = sorted({m.group(1) for m in parsed if m})
        numbers = sorted({int(m.group(2)) for m in parsed if m})
        if len(prefixes) > 1 and len(numbers) <= 2 * COLUMNS:
            for s, m in zip(slots, parsed, strict=True):
                assert m is not None
                cells[s] = (prefixes.index(m.group(1)), numbers.index(int(m.group(2))))
            return cells
        order = sorted(slots, key=lambda s: (prefixes.index(_m(s).group(1)),
                                             int(_m(s).group(2))))
    else:
        order = sorted(slots)
    for i, s in enumerate(order):
        cells[s] = divmod(i, COLUMNS)
    return cells


def _m(slot: str) -> re.Match[str]:
    m = re.fullmatch(r"(.*?)(\d+)", slot)
    assert m is not None
    return m


def _dark(colour: Any) -> bool:
    r, g, b = matplotlib.colors.to_rgb(colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.45  # relative luminance


def _map_cells(stats: Stats) -> tuple[dict[str, tuple[float, int, str]],
                                      list[tuple[float, str]]]:
    """slot -> (row, column, label); and the station titles (row, name) when a report
    holds several stations: one hub map each, one under the other."""
    if len(stats.stations) <= 1:
        cells = hub_layout([s.slot for s in stats.slots])
        return {s: (float(r), c, s) for s, (r, c) in cells.items()}, []
    out: dict[str, tuple[float, int, str]] = {}
    titles: list[tuple[float, str]] = []
    top = 0.0
    for station in sorted(stats.stations):
        names = {s.slot: s.slot.removeprefix(f"{station}/") for s in stats.slots
                 if s.slot.startswith(f"{station}/")}
        if not names:
            continue
        titles.append((top, station))
        top += 0.35
        cells = hub_layout(list(names.values()))
        for name, bare in names.items():
            r, c = cells[bare]
            out[name] = (top + r, c, bare)
        top += max(r for r, _ in cells.values()) + 1
    return out, titles


def slot_map(stats: Stats) -> str:
    cells, titles = _map_cells(stats)
    rows = max(r for r, _, _ in cells.values()) + 1
    cols = max(c for _, c, _ in cells.values()) + 1
    cmap = matplotlib.colormaps["RdYlGn"]
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(min(9.0, 1.15 * cols + 0.4), 0.95 * rows + 0.3))
        for top, station in titles:
            ax.text(0.04, -top - 0.2, station, ha="left", va="center", fontsize=9,
                    weight="bold")
        for slot in stats.slots:
            r, c, label = cells[slot.slot]
            y = slot.yield_pct
            colour = GREY if y is None else cmap(max(0.0, (y - 50.0) / 50.0))
            ax.add_patch(Rectangle((c + 0.04, -r - 0.96), 0.92, 0.92, facecolor=colour,
                                   edgecolor=RED if slot.flagged else "white",
                                   linewidth=3 if slot.flagged else 1))
            label = label if len(label) <= 12 else "…" + label[-11:]
            figure = "-" if y is None else f"{y:.0f}%"
            ink = "white" if _dark(colour) else "black"
            ax.text(c + 0.5, -r - 0.3, label + (" !" if slot.flagged else ""), color=ink,
                    ha="center", va="center", fontsize=7.5, weight="bold")
            ax.text(c + 0.5, -r - 0.55, figure, ha="center", va="center", fontsize=10,
                    color=ink)
            ax.text(c + 0.5, -r - 0.8, f"{slot.done}/{slot.done + slot.failed}", color=ink,
                    ha="center", va="center", fontsize=7)
        ax.set_xlim(0, cols)
        ax.set_ylim(-rows, 0)
        ax.set_aspect("equal")
        ax.axis("off")
        return svg(fig, "slots")


def all_charts(stats: Stats) -> dict[str, str]:
    """Chart name -> SVG, only for the charts the data can fill."""
    charts: dict[str, str] = {}
    if stats.timeline:
        charts["timeline"] = timeline(stats)
    if stats.stage_times:
        charts["stages"] = stage_times(stats)
    if stats.failures_by_stage:
        charts["failstage"] = failures_by_stage(stats)
    if stats.slots:
        charts["slots"] = slot_map(stats)
    return charts
