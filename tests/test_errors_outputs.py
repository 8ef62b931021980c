"""Outputs of the data and checkpoint tools through their console scripts (issue 20): an input is never
an output, an existing output is replaced only with --overwrite, an output that cannot be written
fails before any work, a killed run's temporaries do not block the next run, a failure leaves
nothing behind; and the bounds and start-up Ctrl-C of stem-train-tokenizer, stem-merge,
stem-preprocess, stem-export. Each case: exit code, exactly one stderr line, no traceback, input intact.

Unwritable directories: tests run as root here, which ignores permission bits, so a read-only
tmpfs is mounted in a private mount namespace (`unshare -m`) where that works, and an immutable
directory (`chattr +i`) is used too; as another user, chmod 0555 is the unwritable directory.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEXT = b'{"text": "the cat sat on the mat"}\n{"text": "a dog and a cat"}\n'
WORDS = "the cat sat on the mat and a dog ran to the park".split()


def _cmd(name: str) -> list[str]:
    """The installed console script, else `python -m` of its module (same program)."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    module = {"stem-import": "import_hf"}.get(name, name.removeprefix("stem-").replace("-", "_"))
    return [sys.executable, "-m", f"stem_megatron.cli.{module}"]


def _run(name: str, *args, wrap=(), timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    p = subprocess.run([*wrap, *_cmd(name), *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=timeout)
    return p.returncode, p.stderr


def _one_line(err: str, prog: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and "Traceback" not in err, err
    return lines[0]


def _tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"" for p in sorted(Path(path).rglob("*"))}


# ------------------------------------------------------------------ the module's one fixture
def _hf_dir(path: Path, cfg) -> None:
    """A Llama checkpoint of `cfg`'s shape: config.json + random model.safetensors (no transformers)."""
    from safetensors.torch import save_file

    from stem_megatron.hf_import import expected_shapes

    m = cfg.model
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.query_groups,
        "head_dim": m.head_dim, "tie_word_embeddings": m.tie_embeddings, "rope_theta": m.rotary_base,
        "rms_norm_eps": m.norm_epsilon}))
    g = torch.Generator().manual_seed(0)
    save_file({k: 0.1 * torch.randn(s, generator=g) for k, s in expected_shapes(cfg).items()},
              str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """hf/ (a tiny Llama), cfg.yaml, imported/ (its weights-only stem-import, with the tokenizer),
    text.jsonl (200 records), tokenizer.json, and parts p0, p1 (indexed datasets of 2 documents).
    Complete enough that, before the fix, stem-edit/-analyze/-eval ran all their work and failed in
    the write."""
    from data_tools.train_tokenizer import save_tokenizer, train_bpe
    from data_tools.writer import IndexedOutput, token_dtype
    from stem_megatron.hf_import import import_hf
    from stem_megatron.testing.models import tiny_config

    root = tmp_path_factory.mktemp("outputs")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(200)]
    (root / "text.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    save_tokenizer(train_bpe(lines, vocab_size=270), str(root / "tokenizer.json"))
    cfg = tiny_config(num_layers=2, stem_layers=[1], vocab_size=270, seq_length=128)
    cfg.data.tokenizer = str(root / "tokenizer.json")
    _hf_dir(root / "hf", cfg)
    (root / "cfg.yaml").write_text(cfg.to_yaml())
    import_hf(str(root / "hf"), cfg, str(root / "imported"))
    for i in range(2):
        out = IndexedOutput(str(root / f"p{i}"), token_dtype(270))
        out.add_documents(np.arange(10 + i, dtype=token_dtype(270)), np.array([4, 6 + i]))
        out.commit()
    return root


# ------------------------------------------------------------------ unwritable directories
def _ro_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    p = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt && ! touch /mnt/x"],
                       capture_output=True)
    return p.returncode == 0


RO_MOUNT = os.geteuid() == 0 and _ro_mount_works()


def _readonly(directory: Path) -> tuple[str, ...]:
    """A command prefix under which `directory` is unwritable: a read-only tmpfs mounted over it in a
    private mount namespace (root), or nothing after chmod 0555 (not root)."""
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return ()
    if not RO_MOUNT:
        pytest.skip("root without mount namespaces: no read-only directory can be made here")
    return ("unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(directory))


class _Immutable:
    """`chattr +i` on a directory (root ignores permission bits, not this), undone on exit."""

    def __init__(self, directory: Path):
        directory.mkdir()
        self.directory = directory
        ok = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
        if not ok:
            pytest.skip("chattr +i does not work here (not root, or a file system without it)")

    def __enter__(self):
        return self.directory

    def __exit__(self, *exc):
        subprocess.run(["chattr", "-i", str(self.directory)], check=True)


def _unwritable_cases(w: Path, out: Path):
    return {
        "stem-import": ("--hf", w / "hf", "--config", w / "cfg.yaml", "--output", out / "ckpt"),
        "stem-edit": ("--model", w / "imported", "--prompt", "the cat ran", "--source", "cat", "--target", "sat",
                      "--mode", "one_to_one", "--persist", out / "edited"),
        "stem-analyze": ("--model", w / "imported", "--corpus", w / "text.jsonl", "--output", out / "analysis"),
        "stem-eval": ("niah", "--model", w / "imported", "--haystack", w / "text.jsonl", "--output", out / "niah"),
        "stem-train-tokenizer": ("--input", w / "text.jsonl", "--vocab-size", 300, "--output", out / "tok.json"),
    }


@pytest.mark.parametrize("tool", ["stem-import", "stem-edit", "stem-analyze", "stem-eval", "stem-train-tokenizer"])
def test_an_output_on_a_read_only_file_system_fails_first_in_one_line(world, tmp_path, tool):
    before = _tree(world)
    wrap = _readonly(tmp_path / "ro")
    code, err = _run(tool, *_unwritable_cases(world, tmp_path / "ro")[tool], wrap=wrap)
    prog = "stem-eval niah" if tool == "stem-eval" else tool
    line = _one_line(err, prog)
    assert code == 2 and f"cannot write in {tmp_path / 'ro'}" in line, line
    assert _tree(world) == before


@pytest.mark.parametrize("tool", ["stem-train-tokenizer", "stem-import"])
def test_an_output_in_an_immutable_directory_fails_first_in_one_line(world, tmp_path, tool):
    with _Immutable(tmp_path / "locked") as locked:
        code, err = _run(tool, *_unwritable_cases(world, locked)[tool])
        assert code == 2 and "Operation not permitted" in _one_line(err, tool)
        assert list(locked.iterdir()) == []


# ------------------------------------------------------------------ stem-train-tokenizer
def test_train_tokenizer_never_writes_over_its_input(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(TEXT)
    for extra in ((), ("--overwrite",)):
        code, err = _run("stem-train-tokenizer", "--input", corpus, "--vocab-size", 300, "--output", corpus, *extra)
        assert code == 2 and "is the input" in _one_line(err, "stem-train-tokenizer")
        assert corpus.read_bytes() == TEXT and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_train_tokenizer_replaces_an_output_only_with_overwrite(world, tmp_path):
    out = tmp_path / "tokenizer.json"
    out.write_text("mine")
    args = ("--input", world / "text.jsonl", "--vocab-size", 300, "--output", out)
    code, err = _run("stem-train-tokenizer", *args)
    assert code == 2 and "exists" in _one_line(err, "stem-train-tokenizer") and "--overwrite" in err
    assert out.read_text() == "mine"
    assert _run("stem-train-tokenizer", *args, "--overwrite")[0] == 0
    assert json.loads(out.read_text())["model"]["type"] == "BPE"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no temporary left


@pytest.mark.parametrize("arg,value,fragment", [("--min-frequency", -1, "--min-frequency must be in [0"),
                                                ("--vocab-size", 10**10, "--vocab-size must be in [257, 16,777,216]")])
def test_train_tokenizer_bounds_its_numbers_before_training(world, tmp_path, arg, value, fragment):
    args = {"--vocab-size": 300, "--min-frequency": 2} | {arg: value}
    code, err = _run("stem-train-tokenizer", "--input", world / "text.jsonl", "--output", tmp_path / "t.json",
                     *[x for kv in args.items() for x in kv])
    assert code == 2 and fragment in _one_line(err, "stem-train-tokenizer")
    assert list(tmp_path.iterdir()) == []


def test_train_tokenizer_refuses_zero_usable_records(tmp_path):
    corpus = tmp_path / "blank.jsonl"
    corpus.write_text("\n\n")  # blank lines are not records
    code, err = _run("stem-train-tokenizer", "--input", corpus, "--vocab-size", 300, "--output", tmp_path / "t.json")
    assert code == 1 and "no usable records" in _one_line(err, "stem-train-tokenizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl"]


# ------------------------------------------------------------------ stem-merge
def test_merge_refuses_a_bin_shorter_than_its_index(world, tmp_path):
    for ext in (".bin", ".idx"):
        shutil.copy(world / f"p1{ext}", tmp_path / f"cut{ext}")
    with open(tmp_path / "cut.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "cut.bin") - 2)  # one uint16 token short
    before = _tree(tmp_path)
    code, err = _run("stem-merge", "--input", world / "p0", tmp_path / "cut", "--output-prefix", tmp_path / "out" / "m")
    assert code == 1 and "cut.bin is 20 bytes, its .idx counts 22 (truncated)" in _one_line(err, "stem-merge")
    assert _tree(tmp_path) == before  # no out/, no partial files
    from data_tools.merge import MergeError, merge

    with open(tmp_path / "cut.bin", "ab") as f:
        f.write(bytes(6))  # now one token too many: every later input's documents would shift
    with pytest.raises(MergeError, match="cut.bin is 26 bytes, its .idx counts 22 .longer than its index says"):
        merge([str(tmp_path / "cut"), str(world / "p0")], str(tmp_path / "out" / "m"))
    assert not (tmp_path / "out").exists()


def test_merge_never_overwrites_an_existing_output_or_an_input_unasked(world, tmp_path):
    before = _tree(world)
    (tmp_path / "m.bin").write_text("mine")
    code, err = _run("stem-merge", "--input", world / "p0", world / "p1", "--output-prefix", tmp_path / "m")
    assert code == 2 and "m.bin exists" in _one_line(err, "stem-merge") and "--overwrite" in err
    code, err = _run("stem-merge", "--input", world / "p0", world / "p1", "--output-prefix", world / "p1", "--overwrite")
    assert code == 2 and "is the input" in _one_line(err, "stem-merge")
    assert _tree(world) == before and _tree(tmp_path) == {"m.bin": b"mine"}


# ------------------------------------------------------------------ stem-reshard, stem-import
def test_reshard_refuses_a_weights_only_import_before_writing(world, tmp_path):
    before = _tree(world / "imported")
    code, err = _run("stem-reshard", "--input", world / "imported", "--output", tmp_path / "out", "--world-size", 2,
                     "parallel.tensor_model_parallel_size=2")
    assert code == 4 and "is weights-only" in _one_line(err, "stem-reshard")
    assert list(tmp_path.iterdir()) == [] and _tree(world / "imported") == before


def test_reshard_refuses_an_output_inside_the_input_save_directory(world):
    before = _tree(world / "imported")
    code, err = _run("stem-reshard", "--input", world / "imported", "--output", world / "imported" / "resharded",
                     "--world-size", 1)
    assert code == 2 and "is inside the input" in _one_line(err, "stem-reshard")
    assert _tree(world / "imported") == before


def test_import_after_a_killed_import_removes_its_stale_temporary(world, tmp_path):
    out = tmp_path / "ckpt"
    stale = out / ".tmp-step_00000000"  # what `kill -9` during the write leaves: the output and a part
    stale.mkdir(parents=True)
    (stale / "__0_0.distcp").write_bytes(b"half")
    code, err = _run("stem-import", "--hf", world / "hf", "--config", world / "cfg.yaml", "--output", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_00000000"]


# ------------------------------------------------------------------ bounds and start-up
def test_preprocess_bounds_the_partition_count(world, tmp_path):
    t0 = time.perf_counter()
    code, err = _run("stem-preprocess", "--input", world / "text.jsonl", "--tokenizer", world / "tokenizer.json",
                     "--output-prefix", tmp_path / "p", "--partition", "0/10000000000", timeout=120)
    assert code == 2 and "need 1 <= N <= 1,000,000" in _one_line(err, "stem-preprocess")
    assert time.perf_counter() - t0 < 60 and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches /proc/PID/maps for torch being loaded")
@pytest.mark.parametrize("tool", ["stem-merge", "stem-export"])
def test_ctrl_c_while_starting_is_one_line_and_exit_130(world, tmp_path, tool):
    """SIGINT as soon as torch's library is mapped: the command is still importing (seconds)."""
    args = {"stem-merge": ("--input", world / "p0", "--output-prefix", tmp_path / "m"),
            "stem-export": ("--checkpoint", world / "imported", "--output", tmp_path / "e")}[tool]
    p = subprocess.Popen([*_cmd(tool), *map(str, args)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                if "libtorch" in f.read():
                    break
        except OSError:  # exited meanwhile: the assertions below say how
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and _one_line(err, tool).startswith(f"{tool}: interrupted (SIGINT)"), err
    assert list(tmp_path.iterdir()) == []
