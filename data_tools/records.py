"""Turn a raw `Record` into its document texts, or into the reason it is skipped.

Reasons (the summary counts skipped records by these names):
- `invalid UTF-8`: bytes that do not decode, or a JSON string with a lone surrogate escape;
- `invalid JSON`: the line does not parse, or parses to something other than an object;
- `missing key`: a `--json-keys` key is absent from the object;
- `non-string value`: a key's value is not a string (number, null, list, ...);
- `empty document`: the text is empty or only whitespace.

A JSONL line with several keys is skipped as a whole when any key is bad, so the per-key
outputs stay aligned document for document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from data_tools.inputs import Record

SKIP_REASONS = ("invalid UTF-8", "invalid JSON", "missing key", "non-string value", "empty document")


class StrictError(RuntimeError):
    """--strict and a record had to be skipped; the message names file:line and the reason."""


@dataclass(frozen=True)
class Skip:
    """A skipped record: where it is and why."""

    path: str
    line: int
    reason: str  # one of SKIP_REASONS
    detail: str

    def message(self) -> str:
        return f"{self.path}:{self.line}: {self.reason} ({self.detail})"


def parse_record(record: Record, json_keys: list[str]) -> dict[str, str] | Skip:
    """The texts of a record keyed by output key (`text` for plain text), or a Skip."""
    try:
        text = record.data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = record.line + record.data.count(b"\n", 0, err.start)
        column = err.start - (record.data.rfind(b"\n", 0, err.start) + 1) + 1
        bad = record.data[err.start : err.start + 1].hex()
        return Skip(record.path, line, "invalid UTF-8", f"byte 0x{bad} at column {column}")
    if record.format == "text":
        texts = {"text": text}
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            return Skip(record.path, record.line, "invalid JSON", f"{err.msg} at column {err.colno}")
        if not isinstance(obj, dict):
            return Skip(
                record.path, record.line, "invalid JSON", f"a JSON {type(obj).__name__}, not an object"
            )
        texts = {}
        for key in json_keys:
            if key not in obj:
                return Skip(record.path, record.line, "missing key", f"no key {key!r}")
            value = obj[key]
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                return Skip(record.path, record.line, "non-string value", f"key {key!r} holds {kind}")
            texts[key] = value
    for key, value in texts.items():
        if not value.strip():
            return Skip(record.path, record.line, "empty document", f"key {key!r} is blank")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return Skip(
                record.path,
                record.line,
                "invalid UTF-8",
                f"key {key!r}: lone surrogate at character {err.start}",
            )
    return texts
