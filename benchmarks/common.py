"""Shared benchmark plumbing: machine description and the docs/benchmarks.md section writer.

Each benchmark owns one section of docs/benchmarks.md delimited by
`<!-- BEGIN name -->` / `<!-- END name -->` and rewrites only that section.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by its benchmark command; numbers are from the machine named in it.\n"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} (no GPU)"


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md with `markdown`."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def print_json_line(figures: dict) -> None:
    """Every benchmark ends by printing one JSON line of its figures."""
    print(json.dumps(figures, sort_keys=True), flush=True)
