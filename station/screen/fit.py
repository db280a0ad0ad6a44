"""Text that fits the width rich gives it: what keeps the live table readable at 80 columns.

rich shortens a cell by cutting its end (`esp3…`, `demo-240ac452e…`), which on a
production line loses what matters: a board is told apart by the last digits of its MAC,
and a progress bar is read by its percent. These renderables measure like Text (a Table
sizes its columns by them) and, given less room than they want, choose what to keep:

    Tail     shortens in the middle, keeping the end: `demo-240ac4269e0c` -> `…ac4269e0c`
    Choice   the first of several texts that fits whole; else the last, cut at its end
    Packed   items joined by `  |  `, on as few lines as the width allows, never split

They are pure functions of their text and the width: the dashboard's tests render them
into a fixed-width Console as the terminal would.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text

ELLIPSIS = "…"
SEPARATOR = "  |  "


def cut_middle(text: Text, width: int, tail: int = 0) -> Text:
    """`text` in `width` cells with its middle left out, the end kept whole.

    The end gets `tail` cells (a whole MAC) where there is room, and three quarters of the
    room in any case; the start gets the rest (a thing name's prefix, when it is wider).
    """
    if text.cell_len <= width:
        return text
    if width <= 1:
        return Text(ELLIPSIS[:width], end="")
    room = width - 1
    end = max(min(room, tail), room - room // 4)
    plain = text.plain  # ASCII in practice (MACs, thing names): one cell per character
    return Text.assemble(text[:room - end], ELLIPSIS, text[len(plain) - end:],
                         no_wrap=True, end="")


class Tail:
    """A name shortened in the middle: `Tail("demo-240ac4269e0c", keep="240ac4269e0c")`.

    `keep` is the part that must stay readable: where the text does not end with it
    (`240ac4269e0c / line-7-0042`, `240ac4269e0c-sensor`) and does not fit, `keep`
    alone is shown, shortened the same way.
    """

    def __init__(self, text: Text | str, keep: str = "", least: int = 8) -> None:
        self.text = text if isinstance(text, Text) else Text(text)
        self.keep = keep
        self.least = least  # the narrowest it asks for ("…" and the MAC's last 7 digits)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        width = self.text.cell_len
        return Measurement(min(self.least, width), width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        text, width = self.text, options.max_width
        if text.cell_len > width and not text.plain.endswith(self.keep):
            text = Text(self.keep, style=text.style)
        yield cut_middle(text, width, tail=len(self.keep))


class Choice:
    """Alternatives, widest first: a bar with its byte counts, or the bar alone."""

    def __init__(self, *texts: Text) -> None:
        self.texts = texts or (Text(""),)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        widths = [t.cell_len for t in self.texts]
        return Measurement(min(widths), max(widths))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        fits = [t for t in self.texts if t.cell_len <= options.max_width]
        text = (fits or self.texts[-1:])[0].copy()
        text.no_wrap, text.overflow, text.end = True, "ellipsis", ""
        yield text


class Packed:
    """Items on one line joined by `  |  ` where they fit, else on the next lines.

    An item is never split: `up 1:02:03` stays together; one longer than the whole width
    has a line of its own, cut at its end.
    """

    def __init__(self, items: Sequence[Text | str], style: str = "") -> None:
        self.items = [i if isinstance(i, Text) else Text(i) for i in items if i]
        self.style = style

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        widths = [i.cell_len for i in self.items] or [0]
        return Measurement(max(widths), sum(widths) + len(SEPARATOR) * (len(widths) - 1))

    def lines(self, width: int) -> list[Text]:
        lines: list[Text] = []
        for item in self.items:
            if lines and lines[-1].cell_len + len(SEPARATOR) + item.cell_len <= width:
                lines[-1].append(SEPARATOR).append_text(item)
            else:
                lines.append(Text(style=self.style, no_wrap=True, overflow="ellipsis")
                             .append_text(item))
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.lines(options.max_width)
