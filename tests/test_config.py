"""Config loading and validation: every rule gives a one-line ConfigError naming its key; YAML round
trip; dotted overrides; derived values; every shipped config under configs/ loads and validates."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from stem_megatron.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    StemConfig,
    apply_overrides,
    load_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

BASE = {
    "model": {
        "num_layers": 4,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 512,
        "vocab_size": 1000,
        "seq_length": 64,
    },
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "train_steps": 100, "warmup_steps": 10},
    "data": {"mock": True},
}


def _config(*overrides: str) -> ExperimentConfig:
    return ExperimentConfig.from_dict(apply_overrides(BASE, overrides))


def _error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_base_config_is_valid():
    cfg = _config()
    assert cfg.stem_layers == []
    assert cfg.model.head_dim == 32


# (overrides, the message's start: the key it names, a substring stating the rule)
BAD = [
    (["model.hidden_size=0"], "model.hidden_size=0", "must be positive"),
    (["model.num_layers=-2"], "model.num_layers=-2", "must be positive"),
    (["model.rope_scaling_factor=0"], "model.rope_scaling_factor=0", "must be positive"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0", "must be positive"),
    (
        ["model.num_attention_heads=7", "model.num_query_groups=null"],
        "model.num_attention_heads=7",
        "must divide model.hidden_size=128",
    ),
    (["model.num_query_groups=3"], "model.num_query_groups=3", "must divide model.num_attention_heads=4"),
    (["model.normalization=BatchNorm"], 'model.normalization="BatchNorm"', "one of RMSNorm, LayerNorm"),
    (
        ["model.transformer_impl=apex"],
        'model.transformer_impl="apex"',
        "one of auto, local, transformer_engine",
    ),
    (["model.hidden_dropout=1.0"], "model.hidden_dropout=1.0", "must be in [0, 1)"),
    (
        ["parallel.tensor_model_parallel_size=8"],
        "parallel.tensor_model_parallel_size=8",
        "must divide model.num_attention_heads=4",
    ),
    (
        ["parallel.tensor_model_parallel_size=4"],
        "parallel.tensor_model_parallel_size=4",
        "must divide model.num_query_groups=2",
    ),
    (
        ["parallel.tensor_model_parallel_size=2", "model.ffn_hidden_size=511"],
        "parallel.tensor_model_parallel_size=2",
        "must divide model.ffn_hidden_size=511",
    ),
    (
        ["parallel.pipeline_model_parallel_size=3"],
        "parallel.pipeline_model_parallel_size=3",
        "must divide model.num_layers=4",
    ),
    (
        ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=4"],
        "parallel.virtual_pipeline_model_parallel_size=4",
        "must divide model.num_layers=4",
    ),
    (
        ["parallel.virtual_pipeline_model_parallel_size=2"],
        "parallel.virtual_pipeline_model_parallel_size=2",
        "requires parallel.pipeline_model_parallel_size > 1",
    ),
    (
        ["parallel.sequence_parallel=true"],
        "parallel.sequence_parallel=true",
        "requires parallel.tensor_model_parallel_size > 1",
    ),
    # CP > 1 is refused whatever the transformer implementation: sequences are not split over CP ranks.
    (["parallel.context_parallel_size=2"], "parallel.context_parallel_size=2", "is not supported yet"),
    (
        ["parallel.context_parallel_size=2", "model.transformer_impl=transformer_engine"],
        "parallel.context_parallel_size=2",
        "is not supported yet",
    ),
    (["parallel.context_parallel_size=0"], "parallel.context_parallel_size=0", "must be positive"),
    (
        ["data.reset_attention_mask=true", "model.transformer_impl=transformer_engine"],
        "data.reset_attention_mask=true",
        "TE attention would ignore the document mask",
    ),
    (["stem.ratio=quarter"], 'stem.ratio="quarter"', "one of one_third, half, all"),
    (["stem.ratio=half", "stem.layers=[1]"], "stem.layers=[1]", "mutually exclusive with stem.ratio"),
    (["stem.layers=[1, 1]"], "stem.layers=[1, 1]", "unique"),
    (["stem.layers=[4]"], "stem.layers=[4]", "in [0, model.num_layers=4)"),
    (["stem.layers=[-1]"], "stem.layers=[-1]", ">= 0"),
    (["stem.layers=[]"], "stem.layers=[]", "non-empty"),
    (["stem.ratio=one_third", "model.num_layers=2"], 'stem.ratio="one_third"', "gives no STEM layer"),
    (["stem.lr_schedule=linear"], 'stem.lr_schedule="linear"', "one of cosine, wsd, constant"),
    (["stem.shard_size=0"], "stem.shard_size=0", "must be positive"),
    (["stem.exchange=ring"], 'stem.exchange="ring"', "one of flat, hierarchical"),
    (["stem.exchange_scope=epoch"], 'stem.exchange_scope="epoch"', "one of microbatch, step"),
    (["stem.ranks_per_node=0"], "stem.ranks_per_node=0", "must be positive"),
    (["stem.warmup_steps=101"], "stem.warmup_steps=101", "must be <= train.train_steps=100"),
    (["stem.min_lr=0.01", "stem.lr=0.001"], "stem.min_lr=0.01", "must be <= the STEM table lr"),
    (["train.lr_schedule=linear"], 'train.lr_schedule="linear"', "one of cosine, wsd, constant"),
    (["train.precision=fp16"], 'train.precision="fp16"', "one of auto, fp32, bf16"),
    (["train.global_batch_size=7"], "train.global_batch_size=7", "divisible by train.micro_batch_size=2"),
    (["train.warmup_steps=101"], "train.warmup_steps=101", "must be <= train.train_steps=100"),
    (["train.min_lr=1.0"], "train.min_lr=1.0", "must be <= train.lr"),
    (["train.adam_beta2=1.0"], "train.adam_beta2=1.0", "must be in [0, 1)"),
    (["train.wsd_decay_fraction=0"], "train.wsd_decay_fraction=0.0", "must be in (0, 1]"),
    (
        ["train.recompute_granularity=partial"],
        'train.recompute_granularity="partial"',
        "one of null, full, selective",
    ),
    (
        ["train.recompute_granularity=full", "train.recompute_method=fast"],
        'train.recompute_method="fast"',
        "one of null, uniform, block",
    ),
    (
        ["train.recompute_granularity=full", "train.recompute_num_layers=1"],
        "train.recompute_method=null",
        "required when train.recompute_granularity=full",
    ),
    (
        ["train.recompute_granularity=full", "train.recompute_method=uniform"],
        "train.recompute_num_layers=null",
        "required when train.recompute_granularity=full",
    ),
    (["train.recompute_method=block"], 'train.recompute_method="block"', "only applies with"),
    (
        ["train.recompute_granularity=full", "train.recompute_method=block", "train.recompute_num_layers=5"],
        "train.recompute_num_layers=5",
        "layers per pipeline stage",
    ),
    (["data.mock=false"], "data.data_path=[]", "non-empty unless data.mock=true"),
    (["data.data_path=[0.5, a, b]"], "data.data_path=", "alternate weight, prefix"),
    (["data.data_path=[a, b]"], 'data.data_path[0]="a"', "positive weight"),
    (["data.data_path=[0.5, 3]"], "data.data_path[1]=3", "dataset prefix"),
    (["data.data_path=[-1, a]"], "data.data_path[0]=-1", "positive weight"),
    (["data.split=98,2,0,1"], 'data.split="98,2,0,1"', "1 to 3 comma-separated weights"),
    (["data.split=98,x"], 'data.split="98,x"', "1 to 3 comma-separated weights"),
    (["data.split=0,2,0"], 'data.split="0,2,0"', "train > 0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last=0", "must be positive"),
    (["logging.log_interval=0"], "logging.log_interval=0", "must be positive"),
    # types, checked against the annotations
    (['model.hidden_size="128"'], 'model.hidden_size="128"', "must be an integer"),
    (["model.hidden_size=true"], "model.hidden_size=true", "must be an integer"),
    (["model.hidden_size=128.0"], "model.hidden_size=128.0", "must be an integer"),
    (["model.tie_embeddings=1"], "model.tie_embeddings=1", "must be a boolean"),
    (["train.lr=fast"], 'train.lr="fast"', "must be a number"),
    (["train.lr=true"], "train.lr=true", "must be a number"),
    (["model.kv_channels=1.5"], "model.kv_channels=1.5", "must be an integer or null"),
    (["stem.layers=[1, true]"], "stem.layers=[1, true]", "must be a list of integers or null"),
    (["stem.layers=1"], "stem.layers=1", "must be a list of integers or null"),
    (["stem.ratio=3"], "stem.ratio=3", "must be a string or null"),
    (["data.data_path=a"], 'data.data_path="a"', "must be a list"),
    (["model=5"], "model=5", "must be a mapping"),
]


@pytest.mark.parametrize(("overrides", "start", "rule"), BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_value_gives_one_line_error(overrides, start, rule):
    message = _error(_config, *overrides)
    assert message.startswith(start), message
    assert rule in message, message


def test_kv_channels_lifts_the_head_divisibility_rule():
    cfg = _config("model.num_attention_heads=6", "model.num_query_groups=2", "model.kv_channels=16")
    assert cfg.model.head_dim == 16


def test_split_may_omit_trailing_weights():
    assert _config("data.split='100'").data.split == "100"
    assert "must be a string" in _error(_config, "data.split=100")  # YAML reads a bare 100 as an int


def test_int_accepted_for_float_and_stored_as_float():
    cfg = _config("train.lr=1", "train.min_lr=0")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.min_lr, float)


def test_missing_required_key():
    data = copy.deepcopy(BASE)
    del data["model"]["hidden_size"]
    assert _error(ExperimentConfig.from_dict, data) == "model.hidden_size: required key is missing"
    data = copy.deepcopy(BASE)
    del data["train"]
    assert _error(ExperimentConfig.from_dict, data) == "train: required key is missing"


def test_unknown_key_in_data_at_any_level():
    for data in (
        {**BASE, "optimizer": {}},
        {**BASE, "model": {**BASE["model"], "n_layers": 4}},
    ):
        message = _error(ExperimentConfig.from_dict, data)
        assert "unknown key" in message
    assert _error(ExperimentConfig.from_dict, {**BASE, "optimizer": {}}).startswith("optimizer: unknown key")


@pytest.mark.parametrize(
    ("override", "start", "rule"),
    [
        ("model.n_layers=4", "model.n_layers", "unknown key"),
        ("optimizer.lr=1e-3", "optimizer.lr", "unknown key"),
        ("model.hidden_size.x=1", "model.hidden_size.x", "not a section"),
        ("train.lr", "train.lr", "section.field=value"),
        ("=3", "=3", "section.field=value"),
        ("train.lr=[1,", "train.lr", "invalid YAML"),
        ("train.train_steps=abc", 'train.train_steps="abc"', "must be an integer"),
    ],
)
def test_bad_override(override, start, rule):
    message = _error(_config, override)
    assert message.startswith(start) and rule in message, message


def test_overrides_parse_yaml_values():
    cfg = _config("train.lr=3e-4", "stem.layers=[1, 3]", "train.decay_steps=50", "logging.run_name=x=y")
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.stem_layers == [1, 3]
    assert cfg.train.decay_steps == 50
    assert cfg.logging.run_name == "x=y"  # only the first '=' splits
    cfg = _config("stem.ratio=half", "stem.ratio=null")  # later overrides win; null clears
    assert cfg.stem.ratio is None


def test_override_does_not_mutate_its_input():
    data = copy.deepcopy(BASE)
    apply_overrides(data, ["model.hidden_size=256", "stem.ratio=half"])
    assert data == BASE


def test_round_trip_through_yaml(tmp_path):
    cfg = _config("stem.layers=[0, 2]", "train.lr=1e-3", "data.mock=false", "data.data_path=[0.3, a, 0.7, b]",
                  "data.tokenizer=tok.json")
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_load_config_with_overrides_and_yaml_errors(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(_config().to_yaml())
    cfg = load_config(str(path), ["stem.ratio=half", "train.lr=2e-3"])
    assert cfg.stem_layers == [1, 3] and cfg.train.lr == pytest.approx(2e-3)

    path.write_text("model:\n  hidden_size: 1\n  hidden_size: 2\n")
    assert "duplicate key" in _error(load_config, path)
    path.write_text("model: [1, 2\n")
    assert "invalid YAML" in _error(load_config, path)
    path.write_text("- 1\n- 2\n")
    assert "top level of a config must be a mapping" in _error(load_config, path)
    path.write_text(_config().to_yaml().replace("  vocab_size:", "  vocab:"))
    assert _error(load_config, path).startswith("model.vocab: unknown key")
    assert "cannot read config" in _error(load_config, tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("layers", "ratio", "num_layers", "expected"),
    [
        (None, "one_third", 16, [1, 4, 8, 11, 14]),
        (None, "half", 16, [1, 3, 5, 7, 9, 11, 13, 15]),
        (None, "all", 4, [0, 1, 2, 3]),
        (None, "one_third", 32, [1, 4, 8, 11, 14, 17, 20, 24, 27, 30]),
        (None, "half", 4, [1, 3]),
        (None, "one_third", 2, []),
        ([5, 0, 3], None, 8, [0, 3, 5]),
        (None, None, 8, []),
    ],
)
def test_stem_layer_indices(layers, ratio, num_layers, expected):
    assert StemConfig(layers=layers, ratio=ratio).stem_layer_indices(num_layers) == expected


def test_ratio_placement_matches_the_documented_rule():
    for num_layers in range(3, 65):
        for ratio, k in (("one_third", num_layers // 3), ("half", num_layers // 2), ("all", num_layers)):
            got = StemConfig(ratio=ratio).stem_layer_indices(num_layers)
            assert got == [int((j + 0.5) * num_layers / k) for j in range(k)]
            assert len(set(got)) == k and 0 <= got[0] and got[-1] < num_layers


def test_padded_vocab_size_like_megatron():
    model = ModelConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=8, vocab_size=50257, seq_length=8
    )
    assert model.padded_vocab_size() == 50304
    assert model.padded_vocab_size(2) == 50432  # multiple of 128 * 2
    assert model.padded_vocab_size(3) == 50304  # 50304 = 131 * 384
    assert "must be a positive integer" in _error(model.padded_vocab_size, 0)


@pytest.mark.parametrize(
    ("overrides", "world_size", "start", "rule"),
    [
        (["parallel.tensor_model_parallel_size=2"], 3, "world_size=3", "tensor x pipeline x context"),
        ([], 0, "world_size=0", "positive integer"),
        ([], 8, "train.global_batch_size=8", "train.micro_batch_size x data-parallel size = 2 x 8"),
        (["stem.shard_size=3"], 4, "stem.shard_size=3", "data-parallel x context-parallel size = 4 x 1"),
        (
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
                "train.global_batch_size=6",
            ],
            2,
            "train.global_batch_size=6",
            "multiple of",
        ),
    ],
)
def test_validate_world_errors(overrides, world_size, start, rule):
    message = _error(_config(*overrides).validate_world, world_size)
    assert message.startswith(start) and rule in message, message


def test_validate_world_returns_data_parallel_size():
    assert _config().validate_world(4) == 4
    cfg = _config("parallel.tensor_model_parallel_size=2", "stem.shard_size=2")
    assert cfg.validate_world(8) == 4
    assert cfg.num_micro_batches(8) == 1
    assert _config().num_micro_batches(2) == 2


SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_expected_configs_are_shipped():
    names = {p.stem for p in SHIPPED}
    expected = {
        "tiny_stem",
        "tiny_dense",
        "stem_1b",
        "dense_1b",
        "stem_350m_third",
        "stem_350m_half",
        "stem_350m_all",
        "dense_350m",
    }
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert load_config(path, []) == ExperimentConfig.from_dict(cfg.to_dict())
    if path.stem.startswith("tiny"):
        assert cfg.validate_world(2) == 2  # the CPU target: 2 processes
    else:
        assert cfg.validate_world(8) == 8
    assert bool(cfg.stem_layers) == ("stem" in path.stem)


def test_tiny_configs_differ_only_in_stem():
    stem, dense = load_config(CONFIG_DIR / "tiny_stem.yaml"), load_config(CONFIG_DIR / "tiny_dense.yaml")
    assert stem.model == dense.model and stem.train == dense.train and stem.data == dense.data
    assert stem.stem_layers == [1, 3] and dense.stem_layers == []
