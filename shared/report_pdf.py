"""The report as a PDF, laid out by matplotlib: `python -m shared.report ... --pdf report.pdf`.

It renders the Markdown report (shared.report) page by page: headings, paragraphs, bullet lists,
indented command blocks, tables (monospaced, columns aligned, split across pages) and the PNG
figures next to it. No LaTeX or browser is needed, and the text stays text (TrueType fonts), so
it can be searched and copied.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.image import imread

PAGE_W, PAGE_H = 8.27, 11.69  # A4, inches
MARGIN = 0.75
TEXT_W = PAGE_W - 2 * MARGIN
POINT = 1 / 72  # inches
# average glyph width as a share of the font size: DejaVu Sans (text) and DejaVu Sans Mono
SANS_WIDTH, MONO_WIDTH = 0.55, 0.6
HEADINGS = {1: 17, 2: 13.5, 3: 11.5}
BODY, CODE, TABLE_MAX, TABLE_MIN = 9.5, 8, 8, 5
# A table wider than the page at this size is split into tables of fewer columns, each repeating
# the first (the run), so that no row wraps onto lines whose values stand under other headers.
TABLE_SPLIT = 6.5
COLUMN_GAP = 2  # spaces between two columns
# Tables keep to this share of the text width: a screen at 100 dpi rounds each small glyph's
# advance up to whole pixels, which widens a 7 pt monospaced line by about 6%.
TABLE_SHARE = 0.92


@dataclass
class Line:
    """One line of text to place: its font size, family, weight and left indent (inches)."""

    text: str
    size: float
    family: str = "sans-serif"
    weight: str = "normal"
    indent: float = 0.0


def plain(text: str) -> str:
    """Markdown inline markup made readable as plain text: **x** -> x, `x` -> x,
    [x](y) -> x (y)."""
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1 (\2)", text)


def wrap(text: str, size: float, width: float = TEXT_W, mono: bool = False) -> list[str]:
    """`text` cut into lines that fit `width` inches at `size` points."""
    per_char = size * POINT * (MONO_WIDTH if mono else SANS_WIDTH)
    return textwrap.wrap(text, max(10, int(width / per_char)), break_long_words=True,
                         break_on_hyphens=False) or [""]


def chars_that_fit(size: float) -> int:
    """How many monospaced characters at `size` points a table line may hold (TABLE_SHARE of the
    text width)."""
    return int(TABLE_SHARE * TEXT_W / (size * MONO_WIDTH * POINT))


def column_groups(widths: list[int], limit: int) -> list[list[int]]:
    """The columns (of `widths` characters) split into groups that each start with column 0 and
    fit `limit` characters with COLUMN_GAP between columns; one group when all fit. A column too
    wide to share a group gets one of its own (with column 0)."""
    groups, current = [], [0]
    for column in range(1, len(widths)):
        if sum(widths[c] for c in current) + widths[column] + COLUMN_GAP * len(current) > limit \
                and len(current) > 1:
            groups.append(current)
            current = [0]
        current.append(column)
    return groups + [current]


def table_lines(rows: list[list[str]]) -> list[Line]:
    """A Markdown table's rows as monospaced lines with aligned columns, in the largest font
    (TABLE_MAX down to TABLE_MIN) at which they fit the page. A table that does not fit at
    TABLE_SPLIT is split into several (column_groups), one after the other; a single column
    wider than the page wraps its lines."""
    columns = max(len(row) for row in rows)
    rows = [row + [""] * (columns - len(row)) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(columns)]
    lines: list[Line] = []
    for group in column_groups(widths, chars_that_fit(TABLE_SPLIT)):
        texts = [(" " * COLUMN_GAP).join(row[i].ljust(widths[i]) for i in group).rstrip()
                 for row in rows]
        texts.insert(1, (" " * COLUMN_GAP).join("-" * widths[i] for i in group))
        longest = max(len(t) for t in texts)
        # half a character of slack, so that chars_that_fit(size) rounds down to `longest`
        size = max(TABLE_MIN, min(TABLE_MAX,
                                  TABLE_SHARE * TEXT_W / ((longest + 0.5) * MONO_WIDTH * POINT)))
        if lines:
            lines.append(Line("", size, "monospace"))
        lines += [Line(piece, size, "monospace") for text in texts
                  for piece in wrap(text, size, TABLE_SHARE * TEXT_W, mono=True)]
    return lines


def blocks(markdown: str) -> list[list[Line] | Path]:
    """The report's Markdown as blocks to place: lists of lines, or an image's file name. A
    paragraph's or list item's lines are joined and wrapped again, so the Markdown's own line
    breaks do not show."""
    out: list[list[Line] | Path] = []
    paragraph: list[str] = []
    item: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if paragraph:
            out.append([Line(t, BODY) for t in wrap(plain(" ".join(paragraph)), BODY)])
            paragraph.clear()
        if item:
            pieces = wrap(plain(" ".join(item)), BODY, TEXT_W - 0.25)
            out.append([Line(("• " if i == 0 else "  ") + t, BODY, indent=0.1)
                        for i, t in enumerate(pieces)])
            item.clear()
        if table:
            out.append(table_lines(table))
            table.clear()

    for raw in markdown.splitlines():
        line = raw.rstrip()
        heading = re.match(r"^(#{1,3}) (.*)", line)
        image = re.match(r"^!\[[^\]]*\]\(([^)]+)\)$", line.strip())
        if line.startswith("|"):
            if paragraph or item:
                flush()
            cells = [plain(c.strip()) for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r"-{3,}|:?-+:?", c) for c in cells):
                table.append(cells)
            continue
        if table:
            flush()
        if not line.strip():
            flush()
        elif heading:
            flush()
            size = HEADINGS[len(heading.group(1))]
            out.append([Line(t, size, weight="bold") for t in wrap(plain(heading.group(2)), size)])
        elif image:
            flush()
            out.append(Path(image.group(1)))
        elif line.startswith("    ") and not item:
            flush()
            out.append([Line(t, CODE, "monospace", indent=0.2)
                        for t in wrap(line.strip(), CODE, TEXT_W - 0.2, mono=True)])
        elif re.match(r"^\s*[-*] ", line):
            flush()
            item.append(re.sub(r"^\s*[-*] ", "", line))
        elif item and raw.startswith("  "):
            item.append(line.strip())
        else:
            paragraph.append(line.strip())
    flush()
    return out


class Pages:
    """Places lines and images top to bottom, starting a new page when the next one does not fit."""

    def __init__(self, pdf: PdfPages):
        self.pdf, self.figure, self.y = pdf, None, 0.0

    def _need(self, height: float) -> None:
        if self.figure is None or self.y + height > PAGE_H - MARGIN:
            self.close_page()
            self.figure = Figure(figsize=(PAGE_W, PAGE_H))
            self.y = MARGIN

    def line(self, line: Line) -> None:
        height = line.size * POINT * 1.35
        self._need(height)
        self.figure.text((MARGIN + line.indent) / PAGE_W, 1 - (self.y + line.size * POINT) / PAGE_H,
                         line.text, fontsize=line.size, family=line.family, weight=line.weight)
        self.y += height

    def image(self, path: Path) -> None:
        pixels = imread(path)
        height = TEXT_W * pixels.shape[0] / pixels.shape[1]
        self._need(height)
        axes = self.figure.add_axes((MARGIN / PAGE_W, 1 - (self.y + height) / PAGE_H,
                                     TEXT_W / PAGE_W, height / PAGE_H))
        axes.imshow(pixels)
        axes.axis("off")
        self.y += height + 0.1

    def gap(self, inches: float) -> None:
        self.y += inches

    def close_page(self) -> None:
        if self.figure is not None:
            self.pdf.savefig(self.figure)
            self.figure = None


def write_pdf(markdown: str, figures_dir: Path, out: Path) -> None:
    """Render the report's Markdown into the PDF `out`; images are read from figures_dir."""
    with matplotlib.rc_context({"pdf.fonttype": 42}), PdfPages(out) as pdf:
        pages = Pages(pdf)
        for block in blocks(markdown):
            if isinstance(block, Path):
                pages.image(figures_dir / block)
            else:
                if block[0].weight == "bold":
                    pages.gap(0.08)
                for line in block:
                    pages.line(line)
            pages.gap(0.07)
        pages.close_page()
