"""Formats every report shares: sizes, shapes, numbers, statuses, and the table that fits its width.

Tables are :class:`LineTable`: one line per row in rich's heavy-head look, at a cost linear
in its cells (rich's ``Table`` measures every cell, about 1 ms a row: 12 s for a
10,000-key checkpoint). A table that would be wider than the console shrinks its flexible
columns: keys and paths keep their start and end around a middle ellipsis (a ``grep`` for
either still finds the row), messages wrap onto continuation lines. The JSON has every cell
whole.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Iterator

from rich import filesize
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

STATUS_STYLE = {
    # green: fine
    "match": "green", "ok": "green", "verified": "green", "read ok": "green", "same": "green", "MATCH": "green",
    "clean": "green", "within tolerance": "green",
    # red: the check failed
    "differs": "bold red", "missing": "bold red", "unexpected": "bold red", "replica-differs": "bold red",
    "PROBLEM": "bold red", "MISMATCH": "bold red", "UNREADABLE": "bold red", "DIFFERENT": "bold red",
    "MISSING": "bold red", "OUTSIDE": "bold red", "SYMLINK": "bold red", "only in A": "bold red",
    "only in B": "bold red", "KIND DIFFERS": "bold red", "SHAPE DIFFERS": "bold red", "DTYPE DIFFERS": "bold red",
    "DIFFERS": "bold red", "ERROR": "bold red",
    # yellow: look at it
    "LEFTOVER": "bold yellow", "INCOMPLETE": "bold yellow", "unreferenced": "yellow", "SUSPICIOUS": "bold yellow",
}


def clean(text: Any) -> str:
    """``text`` as one printable line: control characters (a hostile key's escape codes) shown escaped."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fmt_bytes(n: int | float | None) -> str:
    """Bytes in decimal units, as ``du --si`` would: 999 bytes, 1.2 kB, 3.4 MB."""
    return "-" if n is None else filesize.decimal(int(n), precision=1)


def fmt_shape(shape: Any) -> str:
    """[2, 8]; ``scalar`` for a 0-dim tensor; ``-`` for none."""
    if shape is None:
        return "-"
    shape = list(shape)
    return "scalar" if not shape else "[" + ", ".join(str(s) for s in shape) + "]"


def fmt_tensor(shape: Any, dtype: str | None) -> str:
    """'[2, 8] float32', 'scalar int64', or 'object' for a non-tensor value."""
    if shape is None:
        return "object"
    return f"{fmt_shape(shape)} {dtype}" if dtype else fmt_shape(shape)


def fmt_number(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def fmt_seconds(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.3f}s" for name, seconds in timings.items())


def status_text(status: str, note: str = "") -> Text:
    text = Text(status, style=STATUS_STYLE.get(status, ""))
    if note:
        text.append(" " + clean(note))
    return text


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def counts_line(counts: dict[str, int]) -> str:
    """'3 differs, 1 missing': most frequent first."""
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _width(text: str) -> int:
    return len(text) if text.isascii() else cell_len(text)


def _middle_ellipsis(text: str, width: int) -> str:
    """``text`` cut to ``width`` cells around a middle '…', keeping its start and end."""
    if _width(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head = (width - 1 + 1) // 2
    tail = width - 1 - head
    out_head, out_tail = "", ""
    for c in text:
        if _width(out_head + c) > head:
            break
        out_head += c
    for c in reversed(text):
        if _width(c + out_tail) > tail:
            break
        out_tail = c + out_tail
    return out_head + "…" + out_tail


class LineTable:
    """A table of one line per row (plus continuation lines for wrapped cells) that fits the console.

    Columns are ``fixed`` (never shrunk: statuses, numbers), ``ellipsis`` (keys, paths: a
    middle ellipsis) or ``wrap`` (messages: wrapped at spaces).
    """

    MIN_FLEX = 12  # a shrunk column keeps at least this many cells (or its header's width)

    def __init__(self, title: str | None = None):
        self.title = title
        self.columns: list[tuple[str, str, str]] = []  # (header, justify, overflow)
        self.kept: set[int] = set()  # columns that never shrink (statuses: a cut status is unreadable)
        self.rows: list[list[tuple[str, str]]] = []  # (text, style) per cell

    def add_column(self, header: str, *, justify: str = "left", overflow: str = "fixed", keep: bool = False) -> None:
        if overflow not in ("fixed", "ellipsis", "wrap"):
            raise ValueError(f"overflow {overflow!r}")
        if keep:
            self.kept.add(len(self.columns))
        self.columns.append((header, justify, overflow))

    def add_row(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        row = []
        for cell in cells:
            if isinstance(cell, Text):
                row.append((clean(cell.plain), str(cell.style) if cell.style else ""))
            else:
                row.append((clean(cell), ""))
        self.rows.append(row)

    def widths(self, max_width: int) -> list[int]:
        """Each column's width: its widest cell, flexible columns shrunk until the table fits."""
        widths = [_width(header) for header, _, _ in self.columns]
        for row in self.rows:
            for n, (text, _) in enumerate(row):
                w = _width(text)
                if w > widths[n]:
                    widths[n] = w
        total = sum(widths) + 3 * len(widths) + 1  # "│ " before each cell, " " after, a closing bar
        excess = total - max_width
        flex = [n for n, (_, _, overflow) in enumerate(self.columns) if overflow != "fixed"]
        while excess > 0 and flex:
            floor = {n: max(self.MIN_FLEX, _width(self.columns[n][0])) for n in flex}
            widest = max(flex, key=lambda n: widths[n] - floor[n])
            room = widths[widest] - floor[widest]
            if room <= 0:
                break
            others = sorted((widths[n] for n in flex if n != widest), reverse=True)
            step = min(excess, room, max(1, widths[widest] - (others[0] if others else 0)))
            widths[widest] -= step
            excess -= step
        # Still too wide (a narrow terminal): the other columns give way, widest first, then the flexible
        # ones below their floor, down to 3 cells; kept columns (statuses) never do.
        fixed = [n for n in range(len(widths)) if n not in flex and n not in self.kept]
        for pool in (fixed, [n for n in flex if n not in self.kept]):
            while excess > 0 and pool:
                widest = max(pool, key=lambda n: widths[n])
                if widths[widest] <= 3:
                    break
                widths[widest] -= 1
                excess -= 1
        return widths

    def _lines(self, row: list[tuple[str, str]], widths: list[int]) -> list[list[tuple[str, str]]]:
        """A row as one or more physical lines of cells, each cell fitted to its width."""
        cells: list[list[str]] = []
        for (text, _), width, (_, _, overflow) in zip(row, widths, self.columns):
            if _width(text) <= width:
                cells.append([text])
            elif overflow == "wrap" or (overflow == "fixed" and " " in text):
                cells.append(textwrap.wrap(text, width=width, break_long_words=True, break_on_hyphens=False) or [""])
            else:
                cells.append([_middle_ellipsis(text, width)])
        height = max(len(c) for c in cells)
        return [[(c[i] if i < len(c) else "", row[n][1]) for n, c in enumerate(cells)] for i in range(height)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        # Each rule is (left corner, fill, junction, right corner), as in rich's HEAVY_HEAD box.
        if options.ascii_only:
            top = head_sep = bottom = "+-++"
            head_bar = bar = "|"
        else:
            top, head_sep, bottom, head_bar, bar = "┏━┳┓", "┡━╇┩", "└─┴┘", "┃", "│"
        widths = self.widths(options.max_width)

        def rule(chars: str) -> Segment:
            left, fill, mid, right = chars
            return Segment(left + mid.join(fill * (w + 2) for w in widths) + right + "\n")

        def pad(text: str, width: int, justify: str) -> str:
            gap = width - _width(text)
            return (" " * gap + text) if justify == "right" else (text + " " * gap)

        if self.title:
            yield Segment(_middle_ellipsis(clean(self.title), options.max_width) + "\n", Style(italic=True))
        yield rule(top)
        header_style = Style(bold=True)
        yield Segment(head_bar)
        for (header, justify, _), width in zip(self.columns, widths):
            yield Segment(" " + pad(_middle_ellipsis(header, width), width, justify) + " ", header_style)
            yield Segment(head_bar)
        yield Segment("\n")
        yield rule(head_sep)
        justifies = [j for _, j, _ in self.columns]
        styles: dict[str, Style] = {}
        # Without colour (a cluster log) styles change nothing: one segment per line is faster.
        use_styles = console.color_system is not None
        for row in self.rows:
            for line in self._lines(row, widths):
                plain: list[str] = [bar]
                for (text, style), width, justify in zip(line, widths, justifies):
                    cell = " " + pad(text, width, justify) + " "
                    if style and use_styles:
                        yield Segment("".join(plain))
                        plain = []
                        yield Segment(cell, styles.setdefault(style, Style.parse(style)))
                    else:
                        plain.append(cell)
                    plain.append(bar)
                plain.append("\n")
                yield Segment("".join(plain))
        yield rule(bottom)


def key_value_lines(pairs: list[tuple[str, Any]]) -> Text:
    """A summary block: 'label   value' lines, the labels padded to one width; values never markup."""
    width = max((len(label) for label, _ in pairs), default=0)
    out = Text()
    for n, (label, value) in enumerate(pairs):
        if n:
            out.append("\n")
        out.append(label.ljust(width), style="bold")
        out.append("  ")
        out.append(value if isinstance(value, Text) else Text(clean(value)))
    return out
