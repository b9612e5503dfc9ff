"""The physical lines of a raw file and the CSV records they hold, counted from the bytes.

The CSV reader counts records, not lines: one stray quote makes it read the following lines as one
quoted field, and those rows would vanish from "rows in". So the layout is derived here from the bytes,
with the state machine of Python's csv module (excel dialect, non-strict: a quote opens a quoted field
only at the start of a field, text after a closing quote continues the field), and the reader's
output is checked against it. Only lines holding a quote need that walk; the others are one record
each (or part of a quoted field the walk is inside), and are counted vectorised.

A record that spans several lines is accepted as a quoted newline only where the kind allows it
(names in the reference files), the quote closes and the record has the expected field count.
Otherwise its first line is an ``unbalanced_quote`` line: it is quarantined, and reading resumes on
the next line, so the lines it would have swallowed are read as records of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

BOM = b"\xef\xbb\xbf"
FIELD_COUNT_RULE = "field_count"
UNBALANCED_QUOTE_RULE = "unbalanced_quote"

_EVENTS = re.compile(rb'[",]')
_START, _UNQUOTED, _QUOTED, _AFTER_QUOTE = range(4)
_QUOTE = ord('"')


@dataclass(frozen=True)
class LineLayout:
    """1-based physical line numbers (header = line 1) of a file's records, by what the reader will do."""

    records: np.ndarray  # first line of each record with the expected field count, in file order
    malformed: np.ndarray  # one-line records with another field count (the reader skips them)
    unbalanced: np.ndarray  # lines whose quote does not close on a record boundary
    data_lines: int  # non-empty lines after the header
    continuation_lines: int = 0  # non-empty lines inside accepted quoted newlines

    @property
    def rows_in(self) -> int:
        return len(self.records) + len(self.malformed) + len(self.unbalanced)

    def covers_every_line(self) -> bool:
        return self.rows_in + self.continuation_lines == self.data_lines


@dataclass(frozen=True)
class _Lines:
    """Byte offsets of each physical line's content (without its CR/LF); ``data``: non-empty, after the header."""

    starts: np.ndarray
    ends: np.ndarray
    data: np.ndarray  # 0-based indices of the data lines

    @classmethod
    def of(cls, raw: bytes) -> _Lines:
        buf = np.frombuffer(raw, dtype=np.uint8)
        newlines = np.flatnonzero(buf == 10)
        starts = np.concatenate(([0], newlines + 1))
        ends = np.concatenate((newlines, [len(buf)]))
        if raw.endswith(b"\n"):  # no line after the last line break
            starts, ends = starts[:-1], ends[:-1]
        if raw.startswith(BOM) and len(starts):
            starts[0] = len(BOM)
        has_cr = ends > starts
        has_cr[has_cr] = buf[ends[has_cr] - 1] == 13
        ends = ends - has_cr
        content = np.flatnonzero(ends > starts)  # the reader skips empty lines
        return cls(starts=starts, ends=ends, data=content[1:])

    def text(self, raw: bytes, index: int) -> bytes:
        return raw[self.starts[index] : self.ends[index]]

    def field_counts(self, raw: bytes, indices: np.ndarray) -> np.ndarray:
        """Commas + 1 per line: exact for lines without quotes."""
        commas = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == 44)
        return np.searchsorted(commas, self.ends[indices]) - np.searchsorted(commas, self.starts[indices]) + 1


def count_lines(raw: bytes) -> int:
    """Physical lines, a last line without its line break included."""
    return raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)


def layout_of(raw: bytes, n_cols: int, newlines_in_values: bool) -> LineLayout:
    """Where each record starts and which lines the reader must not see (unbalanced quotes)."""
    lines = _Lines.of(raw)
    fields = lines.field_counts(raw, lines.data)
    quotes = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == _QUOTE)
    if len(quotes) == 0:
        ok = fields == n_cols
        return LineLayout(records=lines.data[ok] + 1, malformed=lines.data[~ok] + 1,
                          unbalanced=np.empty(0, dtype=np.int64), data_lines=len(lines.data))
    quoted = np.searchsorted(quotes, lines.ends[lines.data]) > np.searchsorted(quotes, lines.starts[lines.data])
    return _walk_quoted(raw, lines, fields, quoted, n_cols, newlines_in_values)


def _walk_quoted(raw: bytes, lines: _Lines, fields: np.ndarray, quoted: np.ndarray, n_cols: int,
                 newlines_in_values: bool) -> LineLayout:
    """Classify every data line: record start, malformed, unbalanced, or inside an accepted quoted newline."""
    status = np.where(fields == n_cols, 0, 1)  # 0 record, 1 malformed, 2 unbalanced, 3 continuation
    quoted_positions = np.flatnonzero(quoted)  # positions into lines.data
    resume = -1
    for k, position in enumerate(quoted_positions):
        if position <= resume:
            continue
        end, state, n_fields = _record_extent(raw, lines, quoted_positions, k)
        if end == position and state != _QUOTED:
            status[position] = 0 if n_fields == n_cols else 1
            resume = position
        elif end > position and newlines_in_values and state != _QUOTED and n_fields == n_cols:
            status[position], status[position + 1 : end + 1] = 0, 3
            resume = end
        else:  # the quote never closes on a record boundary: drop this line, read on from the next
            status[position] = 2
            resume = position
    data = lines.data + 1
    return LineLayout(records=data[status == 0], malformed=data[status == 1], unbalanced=data[status == 2],
                      data_lines=len(data), continuation_lines=int(np.count_nonzero(status == 3)))


def _record_extent(raw: bytes, lines: _Lines, quoted_positions: np.ndarray, k: int) -> tuple[int, int, int]:
    """From the quoted data line ``quoted_positions[k]``: (the data position its record ends on, the
    state there, its field count). Lines without quotes inside a quoted field cannot end it: skipped."""
    position = int(quoted_positions[k])
    state, n_fields = _advance(lines.text(raw, lines.data[position]), _START, 1)
    while state == _QUOTED and k + 1 < len(quoted_positions):
        k += 1
        position = int(quoted_positions[k])
        state, n_fields = _advance(lines.text(raw, lines.data[position]), _QUOTED, n_fields)
    if state == _QUOTED:  # open at the end of the file
        position = len(lines.data) - 1
    return position, state, n_fields


def _advance(line: bytes, state: int, n_fields: int) -> tuple[int, int]:
    """Run the csv module's state machine over one line, visiting only its quotes and commas."""
    last = -1
    for match in _EVENTS.finditer(line):
        position = match.start()
        if position > last + 1 and state in (_START, _AFTER_QUOTE):  # ordinary text in between
            state = _UNQUOTED
        if line[position] == _QUOTE:
            state = {_START: _QUOTED, _QUOTED: _AFTER_QUOTE, _AFTER_QUOTE: _QUOTED}.get(state, state)
        elif state != _QUOTED:
            n_fields, state = n_fields + 1, _START
        last = position
    if len(line) > last + 1 and state in (_START, _AFTER_QUOTE):
        state = _UNQUOTED
    return state, n_fields


def simple_layout(raw: bytes, n_records: int) -> LineLayout | None:
    """Without quotes, malformed rows or blank lines every line after the header is one record: no scan."""
    data_lines = count_lines(raw) - 1
    if data_lines != n_records:
        return None
    none = np.empty(0, dtype=np.int64)
    return LineLayout(records=np.arange(n_records, dtype=np.int64) + 2, malformed=none, unbalanced=none,
                      data_lines=data_lines)


def without_lines(raw: bytes, line_numbers: np.ndarray) -> bytes:
    """The bytes with the content of some lines removed (their line breaks kept: blank lines are skipped)."""
    if len(line_numbers) == 0:
        return raw
    lines = _Lines.of(raw)
    pieces, cursor = [], 0
    for line in line_numbers:
        pieces.append(raw[cursor : lines.starts[line - 1]])
        cursor = int(lines.ends[line - 1])
    pieces.append(raw[cursor:])
    return b"".join(pieces)


def line_texts(raw: bytes, line_numbers: np.ndarray) -> list[str]:
    """The text of a few physical lines (1-based), without the line break."""
    if len(line_numbers) == 0:
        return []
    lines = _Lines.of(raw)
    return [lines.text(raw, line - 1).decode("utf-8", "replace") for line in line_numbers]
