"""`--partition I/N`: a deterministic split of the inputs by file and byte range.

The inputs, in `resolve_inputs` order, are laid end to end as one byte stream (file sizes on
disk, compressed size for .gz). Partition I of N covers stream offsets
[floor(I*T/N), floor((I+1)*T/N)) of the T bytes; the last partition also owns offset T (empty
files at the end). A record belongs to the partition holding the offset where it starts:

- JSONL: a line's first byte. A plain file is entered by seeking, so partition I reads only
  its range (plus the line or paragraph that straddles its end, plus a newline count of the
  prefix for line numbers in messages).
- plain text, one document per file, and every gzip file: the file's first byte (a gzip stream
  cannot be entered in the middle, so it is never split).
- plain text split at blank lines: the first byte of the paragraph's first line.

Every record therefore lands in exactly one partition, in input order, so the outputs of
partitions 0..N-1 concatenated (`stem-merge`) are the bytes of one unpartitioned run.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterator

from data_tools.inputs import (
    InputError,
    InputFile,
    Record,
    _join_paragraph,
    _strip_bom,
    iter_records,
)

_PARTITION = re.compile(r"^(\d+)/(\d+)$")
_WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.strip() removes: a line of only these is blank
_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20
# More partitions than any job array runs (SLURM's MaxArraySize defaults to 1001); N only sizes the
# byte ranges, so the bound is a guard against a typo, not a cost.
MAX_PARTITIONS = 1_000_000


def parse_partition(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; InputError otherwise."""
    m = _PARTITION.match(text.strip())
    if not m:
        raise InputError(f"--partition must be I/N (0-based I, e.g. 0/8), got {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if not 1 <= count <= MAX_PARTITIONS or not 0 <= index < count:
        raise InputError(f"--partition {text}: need 1 <= N <= {MAX_PARTITIONS:,} and 0 <= I < N")
    return index, count


def partition_bounds(files: list[InputFile], index: int, count: int) -> tuple[list[int], int, float]:
    """(per-file stream offsets, start, end) of partition `index` of `count`."""
    bases, total = [], 0
    for f in files:
        bases.append(total)
        total += os.path.getsize(f.path)
    # offset o belongs to the last partition whose start is <= o (`owner`); [start, end) is empty
    # when two starts coincide (fewer bytes than partitions). Only this partition's two bounds are
    # computed: the cost does not grow with N.
    end = float("inf") if index == count - 1 else (index + 1) * total // count
    return bases, index * total // count, end


def owner(starts: list[int], offset: int) -> int:
    """The partition owning stream `offset` given every partition's start (for tests and docs)."""
    return bisect.bisect_right(starts, offset) - 1


def iter_partition_records(
    files: list[InputFile], text_split: str, index: int, count: int
) -> Iterator[Record]:
    """The records of partition `index` of `count`, in input order (see the module docstring)."""
    if count == 1:
        yield from iter_records(files, text_split)
        return
    bases, start, end = partition_bounds(files, index, count)
    for f, base in zip(files, bases):
        size = os.path.getsize(f.path)
        whole = f.gzipped or (f.format == "text" and text_split == "file")
        if whole or size == 0:
            if start <= base < end:
                yield from iter_records([f], text_split)
            continue
        lo, hi = max(0, start - base), end - base
        if hi <= 0 or lo >= size:
            continue
        try:
            with open(f.path, "rb") as stream:
                if f.format == "jsonl":
                    yield from _jsonl_range(f, stream, lo, hi)
                else:
                    yield from _paragraph_range(f, stream, lo, hi)
        except OSError as err:
            raise InputError(f"cannot read {f.path}: {' '.join(str(err).split())}") from err


def _seek_line(stream, lo: int) -> tuple[int, int]:
    """Move to the first line start at or after `lo`; return (offset, 1-based line number)."""
    if lo == 0:
        stream.seek(0)
        return 0, 1
    stream.seek(lo - 1)
    if stream.read(1) != b"\n":
        stream.readline()  # the rest of a line that started before lo
    pos = stream.tell()
    stream.seek(0)
    newlines, left = 0, pos
    while left > 0:  # line numbers for messages: count the prefix's newlines, in C
        chunk = stream.read(min(_CHUNK, left))
        newlines += chunk.count(b"\n")
        left -= len(chunk)
    return pos, newlines + 1


def _jsonl_range(f: InputFile, stream, lo: int, hi: float) -> Iterator[Record]:
    pos, line_no = _seek_line(stream, lo)
    while pos < hi:
        line = stream.readline()
        if not line:
            return
        data = _strip_bom(line) if line_no == 1 else line
        if data.strip():
            yield Record(f.path, line_no, "jsonl", data)
        pos += len(line)
        line_no += 1


def _previous_line_blank(stream, pos: int) -> bool:
    """Whether the line ending at byte pos-1 (a newline) is blank, as `_paragraph_records` sees it."""
    stream.seek(0)
    bom = stream.read(3) == _BOM
    p = pos - 1  # the newline itself
    while p > 0:
        lo = max(0, p - _CHUNK)
        stream.seek(lo)
        chunk = stream.read(p - lo)
        for i in range(len(chunk) - 1, -1, -1):
            byte = chunk[i : i + 1]
            if byte == b"\n":
                return True
            if byte not in _WHITESPACE and not (bom and lo + i < 3):
                return False
        p = lo
    return True


def _paragraph_range(f: InputFile, stream, lo: int, hi: float) -> Iterator[Record]:
    pos, line_no = _seek_line(stream, lo)
    # a non-blank line right after a non-blank one continues a paragraph an earlier range owns
    in_paragraph = pos > 0 and not _previous_line_blank(stream, pos)
    stream.seek(pos)
    owned = False
    lines: list[bytes] = []
    first = 0
    while True:
        line = stream.readline()
        if not line:
            break
        data = _strip_bom(line) if line_no == 1 else line
        if data.strip():
            if not in_paragraph:
                if pos >= hi:
                    break  # this paragraph starts in a later partition
                in_paragraph, owned, first, lines = True, True, line_no, []
            if owned:
                lines.append(data)
        else:
            if owned and lines:
                yield Record(f.path, first, "text", _join_paragraph(lines))
            in_paragraph, owned, lines = False, False, []
        pos += len(line)
        line_no += 1
    if owned and lines:
        yield Record(f.path, first, "text", _join_paragraph(lines))
