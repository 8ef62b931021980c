"""Train / valid / test GPT datasets from a `DataConfig`, over megatron-core's dataset builder.

    train, valid, test = build_gpt_datasets(cfg.data, seq_length=1024, seed=1234,
                                            train_samples=..., valid_samples=..., test_samples=...,
                                            tokenizer=load_tokenizer(cfg.data.tokenizer))

Each item is megatron's `GPTDataset` dict: `tokens`, `labels`, `loss_mask`, `position_ids` and,
when `create_attention_mask`, a boolean `attention_mask` [1, S, S] (True = masked); items of a
blend also carry `dataset_id`.

Where the data comes from:
- `data_cfg.mock`: `MockGPTDataset` (synthetic documents ending in EOD); `data_path` is ignored.
- `data_cfg.data_path = [prefix]`: one indexed dataset, split by documents into train / valid /
  test with `data_cfg.split` ("98,2,0"). This is how the trainer gets its validation set.
- `data_cfg.data_path = [w1, prefix1, w2, prefix2, ...]`: a blend; each prefix is split as
  above and the splits are blended with those weights. Without weights
  (`[prefix1, prefix2]`) datasets are blended in proportion to their sizes.
- `valid_data_path=[...]` (same forms): held-out prefixes for validation instead of a split;
  then all of `data_path` is training data and there is no test split.

A split whose weight is 0 comes back as None. Sample index caches go to `data_cfg.cache_path`,
or to `{prefix}/cache/` next to the data when it is None.

Distributed: call on every rank. With a process group, rank 0 builds (and caches) first and
the other ranks load after a barrier; `is_built_on_rank` (default: every rank) may return
False on ranks that need no data, which then get None. Without a process group everything is
built locally. megatron-core 0.16.1's `BlendedDataset` calls `torch.distributed.get_rank()` on
a cache miss, so without a process group blend indices are computed, not cached.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable

import torch

from stem_megatron.megatron_version import require_tested

require_tested()  # before the first megatron import of a run: an untested release is one line

with warnings.catch_warnings():  # megatron.core's import warns about missing TE/apex
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

from stem_megatron.config import DataConfig
from stem_megatron.data.tokenizer import Tokenizer


class DataError(ValueError):
    """The data configuration cannot be built into datasets; one-line message."""


Blend = tuple[list[str], list[float] | None]


def parse_blend(data_path: list, what: str = "data.data_path") -> Blend:
    """`[prefix, ...]` or `[w1, prefix1, w2, prefix2, ...]` -> (prefixes, weights or None).

    Every prefix must name an existing `.bin` + `.idx` pair; weights must be positive.
    """
    if not data_path:
        raise DataError(f"{what} is empty: give [prefix] or [weight, prefix, ...] (or set data.mock)")
    items = [str(x).strip() for x in data_path]
    if _is_number(items[0]):
        if len(items) % 2:
            raise DataError(f"{what}: weighted form needs weight, prefix pairs; got {len(items)} items")
        weights = []
        for w in items[0::2]:
            if not _is_number(w) or float(w) <= 0:
                raise DataError(f"{what}: weight {w!r} is not a positive number")
            weights.append(float(w))
        prefixes = items[1::2]
    else:
        weights, prefixes = None, items
    for prefix in prefixes:
        if _is_number(prefix):
            raise DataError(f"{what}: {prefix!r} looks like a weight where a prefix belongs")
        if not IndexedDataset.exists(prefix):
            raise DataError(
                f"{what}: no indexed dataset at {prefix} ({prefix}.bin + {prefix}.idx); run stem-preprocess"
            )
    return prefixes, weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _Builder(BlendedMegatronDatasetBuilder):
    """megatron's builder, able to blend with a cache path when there is no process group."""

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized() and args[-1].path_to_cache:
            config = copy.copy(args[-1])
            config.path_to_cache = None  # BlendedDataset needs a process group to write its cache
            args = (*args[:-1], config)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )


def build_gpt_datasets(
    data_cfg: DataConfig,
    *,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    tokenizer: Tokenizer,
    valid_data_path: list | None = None,
    create_attention_mask: bool = True,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple:
    """(train, valid, test) datasets of at least the requested sample counts (None for a split of weight 0).

    `data_cfg` is validated by DataConfig itself (path form, split string); this raises DataError
    for a prefix without its `.bin/.idx`, or a tokenizer without an end-of-document token.
    """
    if seq_length < 1:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    if min(train_samples, valid_samples, test_samples) < 0:
        raise DataError("sample counts must be non-negative")
    if tokenizer.eod is None:
        raise DataError(f"tokenizer {tokenizer.path} has no end-of-document token, which GPT datasets need")
    common = dict(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=os.fspath(data_cfg.cache_path) if data_cfg.cache_path else None,
        tokenizer=tokenizer,
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    if data_cfg.mock:
        config, cls = GPTDatasetConfig(**common), MockGPTDataset
    elif valid_data_path is not None:
        blends = [parse_blend(data_cfg.data_path), parse_blend(valid_data_path, "valid_data_path"), None]
        config, cls = GPTDatasetConfig(blend_per_split=blends, **common), GPTDataset
    else:
        blend = parse_blend(data_cfg.data_path)
        config, cls = GPTDatasetConfig(blend=blend, split=data_cfg.split, **common), GPTDataset
    sizes = [train_samples, valid_samples, test_samples]
    datasets = _Builder(cls, sizes, is_built_on_rank or (lambda: True), config).build()
    return tuple(datasets)
