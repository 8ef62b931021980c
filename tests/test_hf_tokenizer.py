"""Every tokenizer kind the project reads becomes Hugging Face files (`tokenizer.json` +
`tokenizer_config.json`) that `transformers.AutoTokenizer` loads with the project's ids: text
round-trips, ids equal the project's (except where a document spells a special token, which
transformers encodes as that token), and the end-of-document token is the project's `eod`.
"""

import os

import pytest
from fixtures.tiny_tokenizers import DOCUMENTS, corpus, make_tokenizers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SPECIAL_SPELLINGS = ("<|endoftext|>", "</s>", "<s>", "<unk>")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return tmp_path_factory.mktemp("tok"), make_tokenizers(str(tmp_path_factory.mktemp("src")))


@pytest.mark.parametrize("kind", ["huggingface", "gpt2", "tiktoken", "sentencepiece"])
def test_autotokenizer_gives_the_projects_ids(tokenizers, kind):
    from transformers import AutoTokenizer

    from stem_megatron.data.tokenizer import load_tokenizer
    from stem_megatron.hf.tokenizer_files import write_hf_tokenizer

    root, paths = tokenizers
    out = root / kind
    out.mkdir()
    ids = write_hf_tokenizer(paths[kind], kind, str(out), max_length=128)
    hf = AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(paths[kind], kind)
    assert ids["eos_token_id"] == ours.eod == hf.eos_token_id
    assert len(hf) == ours.vocab_size
    texts = DOCUMENTS + corpus(40, seed=7)[:40]
    compared = 0
    for text in texts:
        enc = hf(text, add_special_tokens=False)["input_ids"]
        assert hf.decode(enc) == text, (kind, text)
        if not any(s in text for s in SPECIAL_SPELLINGS):
            assert enc == ours.encode(text), (kind, text)
            compared += 1
    assert compared >= 40
