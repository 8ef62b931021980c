"""Input primitives every command uses, each ending a bad input with the documented one line
(`UserError`, exit 2; a model that does not load is exit 4, in stem_megatron.inference.loading).

- `read_texts(paths, json_key=..., flag=...)`: the documents of JSONL or text files, record by
  record through `data_tools.records.parse_record` (stem-preprocess's own rules, not a copy):
  a record that is not UTF-8, not JSON or lacks the key is an error naming file and line (the
  file is not what the command expects); a record stem-preprocess skips for its content (a
  non-string value such as {"text": 5}, an empty or whitespace-only text) is skipped and counted
  in `skipped`, so an evaluation scores the documents training would have seen.
- `parse_device(text, flag)`: cpu / cuda / cuda:N / mps ..., refused when this machine has no such
  device.
- `say_skipped(prog, skipped)`: the one note line about skipped records.
The numbers' rules are argparse types in `stem_megatron.cli.args`; the model and its tokenizer
are checked by the one loader every command goes through (`stem_megatron.inference.loading`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

from data_tools.inputs import InputError, InputFile, Record, iter_records
from data_tools.records import Skip, parse_record
from stem_megatron.errors import EXIT_INPUT, UserError

# A record skipped for one of these reasons means the file is not what the command reads (wrong
# file, wrong --json-key, a binary): an error. The other reasons are stem-preprocess's content skips.
FATAL_REASONS = ("invalid UTF-8", "invalid JSON", "missing key")
_BOM = b"\xef\xbb\xbf"


def file_format(path: str) -> str:
    """`jsonl` for .jsonl / .jsonl.gz, else `text`."""
    return "jsonl" if path.endswith((".jsonl", ".jsonl.gz")) else "text"


def _line_records(path: str) -> Iterator[Record]:
    """One record per non-blank line (a prompt file), undecoded: parse_record decodes it."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if n == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            if line.strip():
                yield Record(path, n, "text", line.rstrip(b"\r\n"))


def read_texts(paths: list[str], *, json_key: str = "text", flag: str = "--input", split: str = "file",
               skipped: Counter | None = None) -> Iterator[str]:
    """The texts of `paths` in order, lazily (a caller may stop early).

    `split`: how a text file holds documents: `file` (the whole file is one) or `lines` (one per
    non-blank line); a JSONL file always holds one per line. `skipped` counts the records skipped
    by reason. UserError (exit 2) for a missing or unreadable file and for FATAL_REASONS.
    """
    for path in paths:
        if not os.path.isfile(path):
            what = "is a directory, not a file" if os.path.isdir(path) else "no such file"
            raise UserError(f"{flag} {path}: {what}", EXIT_INPUT)
        fmt = file_format(path)
        try:
            records = _line_records(path) if fmt == "text" and split == "lines" else \
                iter_records([InputFile(path, fmt)], "file" if split == "lines" else split)
            for record in records:
                texts = parse_record(record, [json_key])
                if isinstance(texts, Skip):
                    if texts.reason in FATAL_REASONS:
                        hint = " (choose the field with --json-key)" if texts.reason == "missing key" else ""
                        raise UserError(f"{flag} {texts.message()}{hint}", EXIT_INPUT)
                    if skipped is not None:
                        skipped[texts.reason] += 1
                    continue
                yield next(iter(texts.values()))
        except InputError as e:  # data_tools' "cannot read PATH: ..." (gzip, I/O)
            raise UserError(f"{flag} {e}", EXIT_INPUT) from None
        except OSError as e:
            raise UserError(f"{flag} {path}: {e.strerror or e}", EXIT_INPUT) from None


def say_skipped(prog: str, skipped: Counter) -> None:
    """One stderr note: how many records were skipped, by reason (nothing when none were)."""
    from stem_megatron.cli import say

    if skipped:
        detail = ", ".join(f"{reason} {n:,}" for reason, n in sorted(skipped.items()))
        say(prog, f"note: skipped {sum(skipped.values()):,} records that stem-preprocess also skips ({detail})")


def parse_device(text: str | None, flag: str = "--device") -> str:
    """A torch device this machine has; None -> cuda when available, else cpu."""
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {text}: not a device (cpu, cuda, cuda:N, mps, ...)", EXIT_INPUT) from None
    if device.type == "cpu":
        return str(device)
    if device.type == "meta":
        raise UserError(f"{flag} {text}: the meta device holds no data; give cpu or an accelerator", EXIT_INPUT)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {text}: CUDA is not available on this machine (use --device cpu)", EXIT_INPUT)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"{flag} {text}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                            f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})", EXIT_INPUT)
        return str(device)
    try:  # any other backend (mps, xpu, ...): usable only if a tensor can live there
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError, NotImplementedError):
        raise UserError(f"{flag} {text}: no {device.type} device on this machine", EXIT_INPUT) from None
    return str(device)
