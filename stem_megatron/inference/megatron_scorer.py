"""Score windows with a checkpoint's megatron model at any parallel layout (under torchrun).

    scorer = MegatronScorer(ckpt, overrides=["parallel.tensor_model_parallel_size=2"], seq_length=256,
                            batch_size=4)       # collective: every rank
    loss_sum, tokens = scorer.score(batches)   # this rank's batches; sums over all ranks

The model is built and loaded exactly as training resumes it: a `Trainer` on the checkpoint's own
config (its `config.yaml`) with the layout overrides, and `Checkpointer.load` (manifest verified,
any TP/PP/VPP/DP, tables read by row). The layout defaults to TP = PP = 1 (data parallel over
the world); `parallel.*` and `stem.shard_size` overrides choose another. The trainer's dense and
table optimizers are allocated and loaded too: that is the price of reusing the one resume path.
Forward passes run megatron's forward-only schedule for the layout.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

LAYOUT_DEFAULTS = (
    "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
    "parallel.virtual_pipeline_model_parallel_size=null", "parallel.sequence_parallel=false",
    "parallel.context_parallel_size=1", "stem.shard_size=null",
)
ALLOWED_OVERRIDES = ("parallel.", "stem.shard_size", "model.transformer_impl")


def _defaults_not_given(defaults, overrides: list[str]) -> list[str]:
    """The layout defaults for the keys the user's overrides leave out. Passing both would be the
    same key twice on one override list: load_config warns about that (on every rank), and rightly
    so only for what the user typed twice."""
    from stem_megatron.config import parse_override

    given = {parse_override(o)[0] for o in overrides}
    return [d for d in defaults if parse_override(d)[0] not in given]


class _NoData:
    def __len__(self):
        return 1


def _loss_func(loss_mask, output_tensor):
    loss_sum = (output_tensor.float() * loss_mask).sum()
    tokens = loss_mask.sum()
    return loss_sum, tokens.to(torch.int), {"ppl": torch.stack([loss_sum.detach(), tokens.detach()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return out, functools.partial(_loss_func, batch["loss_mask"])


class MegatronScorer:
    def __init__(self, ckpt: str, overrides: list[str], seq_length: int, batch_size: int):
        from megatron.core import parallel_state

        from stem_megatron.config import CheckpointConfig, ConfigError, load_config
        from stem_megatron.training import checkpoint_format as fmt
        from stem_megatron.training.checkpoint import Checkpointer
        from stem_megatron.training.trainer import Trainer

        for o in overrides:
            if not o.startswith(ALLOWED_OVERRIDES):
                raise ConfigError(f"{o}: only parallel.*, stem.shard_size and model.transformer_impl may be overridden")
        self._logdir = tempfile.mkdtemp(prefix="stem-eval-")  # the trainer's TensorBoard writer wants one
        try:
            cfg = load_config(f"{ckpt}/{fmt.CONFIG}", [
                *_defaults_not_given(LAYOUT_DEFAULTS, overrides), "train.micro_batch_size=1", "checkpoint.save=null", "checkpoint.load=null",
                f"logging.tensorboard_dir={self._logdir}", f"model.seq_length={seq_length}", *overrides,
            ])
        except BaseException:
            shutil.rmtree(self._logdir, ignore_errors=True)
            raise
        self.cfg, self.seq_length, self.batch_size = cfg, seq_length, batch_size
        self.trainer = Trainer(cfg)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout is for the result line
                self.trainer.setup(datasets=(_NoData(), None))
                Checkpointer(CheckpointConfig()).load(self.trainer, ckpt)
        except BaseException:
            parallel_state.destroy_model_parallel()
            shutil.rmtree(self._logdir, ignore_errors=True)
            raise
        for m in self.trainer.model:
            m.eval()
        self.dp_rank, self.dp_size = self.trainer.info.dp_rank, self.trainer.info.dp_size
        self.is_reporter = dist.get_rank() == 0
        self._contributes = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                             and parallel_state.get_tensor_model_parallel_rank() == 0)

    @torch.no_grad()
    def score(self, batches: list[dict]) -> tuple[float, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        dev = self.trainer.device
        batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
        model = self.trainer.model
        iters = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
        out = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iters, model=model if len(model) > 1 else model[0],
            num_microbatches=len(batches), seq_length=self.seq_length, micro_batch_size=self.batch_size,
            forward_only=True,
        )
        total = torch.zeros(2, dtype=torch.float64, device=dev)
        if self._contributes:
            for item in out:
                total += item["ppl"].double()
        dist.all_reduce(total)  # one contributor per data-parallel rank
        return total[0].item(), total[1].item()

    def close(self) -> None:
        from megatron.core import parallel_state

        self.trainer.metrics.close()
        parallel_state.destroy_model_parallel()
        shutil.rmtree(self._logdir, ignore_errors=True)
