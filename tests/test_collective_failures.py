"""A failure on one rank ends the step (or the save) on every rank, fast, with one agreed message.

1. A token id outside the vocabulary on one data-parallel rank of the first pipeline stage (PP2 x
   DP2, 4 gloo ranks). Without a check ahead of the schedule, that rank fails in its embedding
   lookup while the second stage waits in a pipeline receive (and the other DP rank in its STEM
   exchange) until the process-group timeout. Every rank must raise the same StemIndexError
   within seconds.
2. A dense (megatron dist_checkpointing) save that fails on one rank (TP2: both ranks write dense
   shards): rank 0's rank-local write (megatron-core 0.16: `common.pt`; 0.19, which has no
   common.pt: `metadata.json`), then rank 1's `.distcp` shard write, each with ENOSPC. Every rank must raise the same
   one-line CheckpointError, `latest` must keep naming the previous checkpoint, no step directory
   appears, and the next save succeeds.
"""

import errno
import os
import time

from stem_megatron.testing.distributed import run_distributed
from stem_megatron.testing.models import TokenDataset

VOCAB, BAD_ID = 256, 256  # 256 = the padded vocabulary at TP1 too: the embedding lookup itself fails
BAD_SAMPLE = 3  # step 0, micro-batch 0 of DP rank 1 (samples 2, 3 at micro-batch 2, DP 2)


class _OneBadToken(TokenDataset):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        if i == BAD_SAMPLE:
            item = dict(item, tokens=item["tokens"].clone())
            item["tokens"][5] = BAD_ID
        return item


def _bad_id_step(rank, world_size):
    from megatron.core import parallel_state

    from stem_megatron.stem.exchange import StemIndexError
    from stem_megatron.testing.models import tiny_config
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_config(pp=2, vocab_size=VOCAB, deterministic=True)
    trainer = Trainer(cfg)
    trainer.setup(datasets=(_OneBadToken(64, cfg.model.seq_length, 60, seed=3), None))
    where = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank())
    t0 = time.perf_counter()
    try:
        trainer.train_step()
        outcome = "no error"
    except StemIndexError as e:
        outcome = str(e)
    return where, outcome, time.perf_counter() - t0


def test_bad_token_id_under_pipeline_parallelism_fails_fast_on_every_rank():
    results = run_distributed(_bad_id_step, world_size=4, timeout=300)
    messages = {msg for _, msg, _ in results}
    assert len(messages) == 1, results
    msg = messages.pop()
    assert msg.startswith(f"token id {BAD_ID} is outside the vocabulary [0, {VOCAB}) on global rank "), msg
    assert "\n" not in msg
    stage0_dp1 = next(r for r, (where, _, _) in enumerate(results) if where == (0, 1))
    assert f"on global rank {stage0_dp1} " in msg, (msg, results)
    assert {where for where, _, _ in results} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for where, _, seconds in results:
        assert seconds < 30, f"stage/dp {where} took {seconds:.1f} s to raise"


def _failing_saves(rank, world_size, root):
    import torch
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from stem_megatron.config import CheckpointConfig
    from stem_megatron.testing.models import reference_model, tiny_config
    from stem_megatron.training import checkpoint_format as fmt
    from stem_megatron.training.checkpoint import Checkpointer, CheckpointError
    from stem_megatron.training.checkpoint_dense import writes_common_pt
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_config(tp=2, deterministic=True)  # TP2: each rank writes its own dense shard
    trainer = Trainer(cfg)
    trainer.checkpointer = Checkpointer(CheckpointConfig(save=root))
    trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
    trainer.load_full_weights(reference_model(cfg, seed=0).state_dict())
    trainer.train_step()
    trainer.checkpointer.save(trainer)
    trainer.train_step()

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save, real_write_item, real_save_config = torch.save, filesystem_async._write_item, serialization.save_config

    def save_but_not_common(obj, f, *args, **kwargs):  # rank 0 writes common.pt (megatron's common state)
        if isinstance(f, str) and f.endswith("common.pt"):
            enospc()
        return real_save(obj, f, *args, **kwargs)

    out = {}
    for case, failing_rank in (("common", 0), ("shard", 1)):
        if rank == failing_rank:
            if case == "common" and writes_common_pt():
                torch.save = save_but_not_common
            elif case == "common":  # 0.19: rank 0's metadata.json, written after the collective save
                serialization.save_config = enospc
            else:
                filesystem_async._write_item = enospc
        t0 = time.perf_counter()
        try:
            trainer.checkpointer.save(trainer)
            out[case] = "saved"
        except CheckpointError as e:
            out[case] = str(e)
        out[case + "_seconds"] = time.perf_counter() - t0
        torch.save, filesystem_async._write_item = real_save, real_write_item
        serialization.save_config = real_save_config
        torch.distributed.barrier()
        out[case + "_latest"] = os.path.basename(fmt.read_latest(root))
        out[case + "_dirs"] = sorted(n for n in os.listdir(root) if fmt.step_of(n) is not None)
    out["retry"] = trainer.checkpointer.save(trainer)
    out["retry_latest"] = os.path.basename(fmt.read_latest(root))
    return out


def test_dense_save_failing_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    root = str(tmp_path / "ckpt")
    results = run_distributed(_failing_saves, world_size=2, args=(root,), timeout=300)
    for case in ("common", "shard"):
        messages = {r[case] for r in results}
        assert len(messages) == 1, (case, [r[case] for r in results])
        msg = messages.pop()
        assert msg != "saved" and "No space left on device" in msg and "\n" not in msg, (case, msg)
        for r in results:
            assert r[case + "_latest"] == "step_00000001", (case, r)
            assert r[case + "_dirs"] == ["step_00000001"], (case, r)
            assert r[case + "_seconds"] < 60, (case, r[case + "_seconds"])
    for r in results:
        assert r["retry"] == os.path.join(root, "step_00000002") and r["retry_latest"] == "step_00000002", r

