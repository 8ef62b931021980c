"""Input discovery and streaming: JSONL (.jsonl, .jsonl.gz) and plain text (.txt, .txt.gz).

`resolve_inputs` turns the command line's paths (files or directories) into an ordered list of
`InputFile`s; `iter_records` streams raw `Record`s (undecoded bytes plus file and line) from
them, never holding more than one record in memory. Decoding, JSON parsing and key checks
happen later (`data_tools.records`), in the worker processes.

Plain text is one document per file (`text_split="file"`) or documents separated by blank lines
(`text_split="blank-lines"`); a document's trailing newline is not part of it in the latter.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass

INPUT_FORMATS = ("jsonl", "text")
TEXT_SPLITS = ("file", "blank-lines")


def add_input_args(p) -> None:
    """The input flags shared by stem-preprocess and stem-train-tokenizer."""
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="JSONL (.jsonl, .jsonl.gz) or text (.txt, .txt.gz) files, or directories of them",
    )
    p.add_argument("--input-format", choices=INPUT_FORMATS, help="force the format instead of the file suffix")
    p.add_argument(
        "--text-split",
        choices=TEXT_SPLITS,
        default="file",
        help="plain text: one document per file (default) or per blank-line-separated block",
    )
_SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".txt": "text", ".txt.gz": "text"}


class InputError(ValueError):
    """An input path is missing, unreadable or of an unknown format; one-line message."""


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # jsonl | text

    @property
    def gzipped(self) -> bool:
        return self.path.endswith(".gz")


@dataclass(frozen=True)
class Record:
    """One document's raw bytes: a JSONL line, a text paragraph or a whole text file."""

    path: str
    line: int  # 1-based line where the record starts
    format: str  # jsonl | text
    data: bytes


def _format_of(path: str) -> str | None:
    for suffix, fmt in _SUFFIXES.items():
        if path.endswith(suffix):
            return fmt
    return None


def resolve_inputs(paths: list[str], input_format: str | None = None) -> list[InputFile]:
    """Files to read, in order: given files as given, directories walked in sorted order.

    In a directory only files ending in .jsonl, .jsonl.gz, .txt or .txt.gz are read (hidden
    files skipped); `input_format` forces the format of every file instead of the suffix.
    """
    if not paths:
        raise InputError("no input given")
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise InputError(
            f"unknown input format {input_format!r} (expected one of {', '.join(INPUT_FORMATS)})"
        )
    files: list[InputFile] = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    full = os.path.join(root, name)
                    fmt = _format_of(name)
                    if not name.startswith(".") and fmt is not None:
                        found.append(InputFile(full, input_format or fmt))
            if not found:
                raise InputError(f"no input files (.jsonl, .jsonl.gz, .txt, .txt.gz) under directory {path}")
            files.extend(found)
        elif os.path.isfile(path):
            fmt = input_format or _format_of(path)
            if fmt is None:
                raise InputError(
                    f"cannot tell the format of {path} (expected .jsonl, .jsonl.gz, .txt or .txt.gz); "
                    "pass --input-format"
                )
            files.append(InputFile(path, fmt))
        elif os.path.exists(path):
            raise InputError(f"input is neither a file nor a directory: {path}")
        else:
            raise InputError(f"input not found: {path}")
    for f in files:
        if not os.access(f.path, os.R_OK):
            raise InputError(f"input not readable: {f.path}")
    return files


def _open(f: InputFile):
    return gzip.open(f.path, "rb") if f.gzipped else open(f.path, "rb")


def iter_records(files: list[InputFile], text_split: str = "file") -> Iterator[Record]:
    """Stream the records of every file in order. Blank JSONL lines are not records."""
    if text_split not in TEXT_SPLITS:
        raise InputError(f"unknown text split {text_split!r} (expected one of {', '.join(TEXT_SPLITS)})")
    for f in files:
        try:
            with _open(f) as stream:
                if f.format == "jsonl":
                    yield from _jsonl_records(f, stream)
                elif text_split == "file":
                    yield Record(f.path, 1, "text", _strip_bom(stream.read()))
                else:
                    yield from _paragraph_records(f, stream)
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
            raise InputError(f"cannot read {f.path}: {' '.join(str(err).split())}") from err


def _strip_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _jsonl_records(f: InputFile, stream) -> Iterator[Record]:
    for line_no, line in enumerate(stream, start=1):
        if line_no == 1:
            line = _strip_bom(line)
        if line.strip():
            yield Record(f.path, line_no, "jsonl", line)


def _paragraph_records(f: InputFile, stream) -> Iterator[Record]:
    lines: list[bytes] = []
    start = 0
    for line_no, line in enumerate(stream, start=1):
        if line_no == 1:
            line = _strip_bom(line)
        if line.strip():
            if not lines:
                start = line_no
            lines.append(line)
        elif lines:
            yield Record(f.path, start, "text", _join_paragraph(lines))
            lines = []
    if lines:
        yield Record(f.path, start, "text", _join_paragraph(lines))


def _join_paragraph(lines: list[bytes]) -> bytes:
    data = b"".join(lines)
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data
