"""The pretraining loop on megatron-core schedules, with STEM tables outside DDP.

One step:
1. every rank builds its micro-batches (`batches.StepBatches`);
2. megatron's forward/backward schedule for the layout (no pipelining, 1F1B, interleaved) runs
   them; each model chunk exchanges its STEM rows once per micro-batch; the loss is summed over
   tokens (`calculate_per_token_loss`) and `finalize_model_grads` scales dense gradients by
   1 / (global number of loss tokens);
3. the table engines reduce their row gradients once per step (scaled by the same 1 / tokens);
4. one global gradient norm over dense and table gradients; clipping scales both;
5. a non-finite loss or norm skips the step on every rank (counted); `train.max_skipped_steps`
   consecutive skips abort the run;
6. megatron's optimizer steps dense parameters, `RowSparseAdamW` the touched table rows, each
   with its own LR schedule.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stem_megatron.config import ExperimentConfig
from stem_megatron.errors import EXIT_CHECKPOINT, UserError, one_line
from stem_megatron.flops import flops_per_token
from stem_megatron.megatron_version import require_tested
from stem_megatron.stem.engine import StemIndexError, table_grad_sq_norm
from stem_megatron.training import signals
from stem_megatron.training.batches import StepBatches
from stem_megatron.training.checkpoint_format import CheckpointError
from stem_megatron.training.lr_schedule import dense_schedule, table_schedule
from stem_megatron.training.metrics import MetricsLogger
from stem_megatron.training.offload_metrics import OffloadMeter
from stem_megatron.training.preflight import default_log_dir, load_checked_tokenizer
from stem_megatron.training.signals import StopSignals

require_tested()  # an untested megatron-core stops here with one line (megatron_version.py)

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "H800": 989e12, "B200": 2250e12}


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    skipped: bool
    tokens: int
    seconds: float
    lr: float
    table_lr: float


def _loss_func(loss_mask, poison, output_tensor):
    losses = output_tensor.float()
    loss_sum = (losses * loss_mask).sum()
    if poison:
        loss_sum = loss_sum * float("nan")
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach().float()])}


def peak_flops() -> float | None:
    """Peak bf16 dense FLOP/s of one device, from STEM_PEAK_TFLOPS or the GPU's name (None on CPU)."""
    if os.environ.get("STEM_PEAK_TFLOPS"):
        return float(os.environ["STEM_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class _Peekable:
    """Iterator over one step's micro-batches that can show coming ones (for STEM prefetch)."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= len(self.items):
            raise StopIteration
        self.i += 1
        return self.items[self.i - 1]

    def peek(self, ahead: int = 0):
        """The micro-batch `ahead` places after the next one (None past the step's end)."""
        j = self.i + ahead
        return self.items[j] if j < len(self.items) else None


def _unwrap(model):
    while hasattr(model, "module"):  # DDP, Float16Module
        model = model.module
    return model


class Trainer:
    """Build with a validated config, `setup()`, then `train()` (or drive `train_step` yourself)."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.step = 0
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.poison_steps: set[int] = set()  # fault injection for tests: these steps' loss becomes NaN
        self.signals = StopSignals()  # SIGTERM/SIGUSR1/SIGINT requests, agreed across ranks each step
        self.checkpointer = None
        self._step_scope_active = False  # this schedule's STEM rows come from one step-scope exchange

    # ------------------------------------------------------------------ setup
    def setup(self, datasets=None) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        from stem_megatron.model import build_model_chunks, stem_engine_factory
        from stem_megatron.parallel import init_distributed, initialize_model_parallel
        from stem_megatron.stem.optimizer import RowSparseAdamW

        cfg = self.cfg
        self._install_signal_handlers()
        init_distributed()
        self.info = initialize_model_parallel(cfg)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.chunks = build_model_chunks(cfg, stem_engine_factory(cfg))
        self.engines = [c.stem_engine for c in self.chunks if c.stem_engine is not None]
        bound = None
        if self.engines and cfg.stem.offload == "host":
            # The dry run's device bound of this stage's host tables (memory.py); the meter reports the
            # measured peak of the same buffers next to it every step.
            from stem_megatron.memory import stage_memory

            stage = parallel_state.get_pipeline_model_parallel_rank()
            bound = stage_memory(cfg, dist.get_world_size())[stage].table_device_bytes
        self.offload_meter = OffloadMeter(self.engines, device_bound_bytes=bound)
        tcfg = self.chunks[0].config
        tcfg.calculate_per_token_loss = True
        self.bf16 = tcfg.bf16
        p = cfg.parallel
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=p.overlap_grad_reduce,
            use_distributed_optimizer=p.use_distributed_optimizer,
        )
        wrapped = [Float16Module(tcfg, c) if self.bf16 else c for c in self.chunks]
        self.model = [
            DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=m, disable_bucketing=i > 0)
            for i, m in enumerate(wrapped)
        ]
        t = cfg.train
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                clip_grad=0.0,  # clipping is global over dense + table gradients, done here
                bf16=self.bf16, params_dtype=tcfg.params_dtype,
                use_distributed_optimizer=p.use_distributed_optimizer,
            ),
            self.model,
        )
        self.table_optimizer = RowSparseAdamW(
            self.engines, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=cfg.stem.weight_decay
        )
        tcfg.finalize_model_grads_func = finalize_model_grads
        if p.overlap_grad_reduce:
            tcfg.no_sync_func = [m.no_sync for m in self.model]
            if len(self.model) == 1:
                tcfg.no_sync_func = tcfg.no_sync_func[0]
            tcfg.grad_sync_func = [m.start_grad_sync for m in self.model]
            if len(self.model) == 1:
                tcfg.grad_sync_func = tcfg.grad_sync_func[0]
        self.dense_lr = dense_schedule(cfg)
        self.table_lr = table_schedule(cfg)
        self.dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.is_logger = dist.get_rank() == 0
        self.flops_per_token = flops_per_token(cfg).training
        self.peak = peak_flops()
        train_ds, valid_ds = datasets if datasets is not None else self._build_datasets()
        mk = functools.partial(
            StepBatches, micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
            dp_rank=self.info.dp_rank, dp_size=self.info.dp_size,
        )
        self.train_batches = mk(train_ds)
        self.valid_batches = mk(valid_ds) if valid_ds is not None else None
        log_dir = default_log_dir(cfg)
        self.metrics = MetricsLogger(log_dir, enabled=self.is_logger)
        self.log_dir = log_dir
        if self.checkpointer is not None:
            self.checkpointer.resume(self)

    def load_full_weights(self, state: dict) -> None:
        """Load full (unsharded, HF-Llama-named) weights, e.g. a `ReferenceStemLM` state dict.

        Also refreshes the optimizer's fp32 main copies (bf16 and distributed optimizer keep their
        own, made at construction; without this the first step would restore the old weights).
        """
        from stem_megatron.convert import load_reference_into_chunks

        load_reference_into_chunks(self.chunks, state, self.cfg)
        self.optimizer.reload_model_params()

    def _build_datasets(self):
        from stem_megatron.data.datasets import build_gpt_datasets

        cfg, t = self.cfg, self.cfg.train
        tokenizer = load_checked_tokenizer(cfg)  # UserError (exit 2) on every rank alike
        n_eval = (t.train_steps // t.eval_interval + 1) * t.eval_iters * t.global_batch_size if t.eval_interval else 0
        train, valid, _ = build_gpt_datasets(
            cfg.data, seq_length=cfg.model.seq_length, seed=t.seed,
            train_samples=t.train_steps * t.global_batch_size, valid_samples=n_eval, test_samples=0,
            # The mask is only needed for document resets; otherwise attention builds its causal mask.
            tokenizer=tokenizer, create_attention_mask=cfg.data.reset_attention_mask,
        )
        return train, valid

    # ------------------------------------------------------------------ one step
    def _check_token_ids(self, batches, what: str = "training") -> None:
        """Raise the same StemIndexError on every rank if any rank's batch has an id outside the vocabulary.

        A bad id otherwise fails only where it is looked up (the first stage's embedding or a STEM
        exchange) while the other pipeline stages wait in a p2p receive until the process-group
        timeout. One all-reduce of a [2, world] int64 tensor over the world, before the schedule.
        Labels are checked where they count in the loss.
        """
        vocab, me = self.cfg.model.vocab_size, dist.get_rank()
        ids = torch.cat([torch.cat([b["tokens"].flatten(), b["labels"][b["loss_mask"] > 0]]) for b in batches])
        bad = ids[(ids < 0) | (ids >= vocab)]
        report = torch.zeros(2, dist.get_world_size(), dtype=torch.int64, device=self.device)
        if bad.numel():
            report[0, me], report[1, me] = bad.numel(), bad[0]
        dist.all_reduce(report)
        ranks = report[0].nonzero().flatten().tolist()
        if ranks:
            r = ranks[0]
            more = f"; {len(ranks) - 1} other rank(s) also had bad ids" if len(ranks) > 1 else ""
            raise StemIndexError(f"token id {int(report[1, r])} is outside the vocabulary [0, {vocab}) on global rank "
                                 f"{r} ({int(report[0, r])} bad id(s) there){more}, in the {what} data (step "
                                 f"{self.step + 1}); was data.data_path made with "
                                 f"another tokenizer than data.tokenizer={self.cfg.data.tokenizer}?")

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        chunk = _unwrap(model)
        depth = self.cfg.stem.prefetch_depth
        # With step scope the whole step's exchange was issued before the schedule (train_step).
        prefetch = self.cfg.stem.prefetch and not self._step_scope_active
        if prefetch and depth > 1 and data_iterator.i == 1:
            # First micro-batch of the step: open the window (this one and the depth - 1 after it).
            chunk.prefetch_stem(batch["tokens"])
            for k in range(depth - 1):
                if data_iterator.peek(k) is not None:
                    chunk.prefetch_stem(data_iterator.peek(k)["tokens"])
        # position_ids reach RoPE only with data.reset_position_ids (model.StemGPTModel._preprocess);
        # attention_mask is in the batch only with data.reset_attention_mask.
        out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
        # Keep `stem.prefetch_depth` micro-batches in flight: issue the one `depth` places ahead.
        upcoming = data_iterator.peek(depth - 1)
        if upcoming is not None and prefetch:
            chunk.prefetch_stem(upcoming["tokens"])
        poison = self.step in self.poison_steps and model.training
        return out, functools.partial(_loss_func, batch["loss_mask"], poison)

    def _run_schedule(self, batches, forward_only: bool) -> torch.Tensor:
        """Run the schedule; returns [loss_sum, tokens] summed over the whole global batch (every rank)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._check_token_ids(batches, "validation" if forward_only else "training")
        model = self.model if len(self.model) > 1 else self.model[0]
        iters = [_Peekable(batches) for _ in self.model] if len(self.model) > 1 else _Peekable(batches)
        # stem.exchange_scope=step: every chunk's table exchange for the whole step, up front
        self._step_scope_active = self.cfg.stem.exchange_scope == "step" and not forward_only
        if self._step_scope_active:
            for chunk in self.model:
                _unwrap(chunk).prefetch_stem_step([b["tokens"] for b in batches])
        out = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iters, model=model,
            num_microbatches=len(batches), seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only,
        )
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.is_last_stage and parallel_state.get_tensor_model_parallel_rank() == 0:
            for item in out:
                total += item["lm loss"].double()
        dist.all_reduce(total)  # one contributor per DP rank (last stage, TP rank 0)
        return total

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.table_optimizer.zero_grad()
        batches = self.train_batches(self.step, self.device)
        if self.engines and self.cfg.stem.offload == "host" and self.cfg.stem.cache_policy == "lookahead":
            # The data order is known: tell the row caches this step's and the next step's ids.
            coming = list(batches)
            if self.step + 1 < self.cfg.train.train_steps:
                coming += self.train_batches(self.step + 1, self.device)
            for e in self.engines:
                e.announce([b["tokens"] for b in coming])
        total = self._run_schedule(batches, forward_only=False)
        loss_sum, tokens = total[0].item(), int(total[1].item())
        for e in self.engines:
            e.reduce_grads()
        found_inf = self.optimizer.prepare_grads()
        dense_norm = self.optimizer.get_grad_norm() or 0.0
        # Table gradients are sums over tokens; dense ones were scaled by 1/tokens in finalize.
        inv_tokens = 1.0 / max(tokens, 1)
        table_sq = table_grad_sq_norm(self.engines).item() * inv_tokens**2
        grad_norm = math.sqrt(dense_norm**2 + table_sq)
        loss = loss_sum / max(tokens, 1)
        lr, table_lr = self.dense_lr(self.step), self.table_lr(self.step)
        skipped = bool(found_inf) or not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips > self.cfg.train.max_skipped_steps:
                raise NonFiniteAbort(
                    f"{self.consecutive_skips} consecutive steps with a non-finite loss or gradient "
                    f"(train.max_skipped_steps={self.cfg.train.max_skipped_steps}); last loss {loss}, grad norm {grad_norm}"
                )
            self.optimizer.zero_grad()
            self.table_optimizer.zero_grad()
        else:
            self.consecutive_skips = 0
            coef = 1.0
            clip = self.cfg.train.clip_grad
            if clip > 0 and grad_norm > clip:
                coef = clip / (grad_norm + 1e-6)
                self._scale_dense_grads(coef)
            for group in self.optimizer.param_groups:
                # megatron's groups carry multipliers that only Megatron-LM's scheduler applies:
                # without this, norms and biases (wd_mult 0) would be weight-decayed.
                group["lr"] = lr * group.get("lr_mult", 1.0)
                group["weight_decay"] = self.cfg.train.weight_decay * group.get("wd_mult", 1.0)
            self.optimizer.step_with_ready_grads()
            self.table_optimizer.step(lr=table_lr, grad_scale=coef * inv_tokens)
        self.step += 1
        return StepResult(step=self.step, loss=loss, grad_norm=grad_norm, skipped=skipped, tokens=tokens,
                          seconds=time.perf_counter() - t0, lr=lr, table_lr=table_lr)

    def _save(self, final: bool = False) -> None:
        """checkpointer.save; a failure becomes a CheckpointError (exit 4) on this rank, reported by
        the rank that knows why (the others only lost their peer in a collective)."""
        try:
            self.checkpointer.save(self, final=final)
        except CheckpointError as e:  # agreed on every rank (checkpoint_collective): the same line everywhere
            raise CheckpointError(f"saving step {self.step} to {self.cfg.checkpoint.save} failed ({e}); the previous "
                                  "checkpoint is intact") from None
        except Exception as e:  # noqa: BLE001 - whatever broke the save, the run ends with exit 4
            # A rank whose peer died mid-collective says nothing: the rank that failed says why.
            peer_gone = isinstance(e, dist.DistError) or "closed by peer" in str(e)
            raise UserError(f"checkpoint error: saving step {self.step} to {self.cfg.checkpoint.save} failed "
                            f"({one_line(e)}); the previous checkpoint is intact",
                            EXIT_CHECKPOINT, reporter="none" if peer_gone else "self") from e

    def _scale_dense_grads(self, coef: float) -> None:
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in optimizers:
            for p in opt.get_parameters():
                grad = getattr(p, "decoupled_grad", None) if opt.config.use_precision_aware_optimizer else p.grad
                if grad is not None:
                    grad.mul_(coef)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean validation loss over `train.eval_iters` global batches."""
        if self.valid_batches is None:
            return None
        for m in self.model:
            m.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(self.cfg.train.eval_iters):
            batches = self.valid_batches(i, self.device)
            total += self._run_schedule(batches, forward_only=True)
        for m in self.model:
            m.train()
        return (total[0] / total[1].clamp_min(1)).item()

    # ------------------------------------------------------------------ loop
    @property
    def stop_requested(self) -> str | None:
        """The stop signal this rank received ("SIGTERM", "SIGUSR1", "SIGINT"), or None."""
        return self.signals.requested

    def _install_signal_handlers(self) -> None:
        self.signals.install()

    def _log_step(self, r: StepResult) -> None:
        cfg = self.cfg
        tokens_per_s = cfg.train.global_batch_size * cfg.model.seq_length / r.seconds
        mfu = None
        if self.peak:
            mfu = self.flops_per_token * tokens_per_s / (self.peak * self.info.world_size)
        stats = {}
        for e in self.engines:
            for k in ("bytes_sent", "bytes_received", "naive_bytes"):
                if k in e.stats:
                    stats[k] = stats.get(k, 0) + e.stats[k]
        uf = [e.stats["unique_fraction"] for e in self.engines if "unique_fraction" in e.stats]
        scalars = {
            "train/loss": r.loss, "train/lr": r.lr, "train/table_lr": r.table_lr, "train/grad_norm": r.grad_norm,
            "perf/tokens_per_s": tokens_per_s, "perf/step_time_s": r.seconds, "perf/mfu": mfu,
            "train/skipped_steps": self.skipped_steps,
            "stem/exchange_bytes_sent": stats.get("bytes_sent"),
            "stem/exchange_bytes_received": stats.get("bytes_received"),
            "stem/unique_fraction": sum(uf) / len(uf) if uf else None,
        }
        offload = self.offload_meter.step_scalars() if self.engines else {}
        scalars.update(offload)
        self.metrics.scalars(r.step, scalars)
        if r.step % cfg.logging.log_interval == 0 or r.step == 1 or r.skipped:
            mfu_txt = f" mfu {100 * mfu:.1f}%" if mfu is not None else ""
            uf_txt = f" uniq {scalars['stem/unique_fraction']:.2f}" if uf else ""
            self.metrics.line(
                f"step {r.step}/{cfg.train.train_steps} loss {r.loss:.4f} lr {r.lr:.2e} grad {r.grad_norm:.3f} "
                f"{tokens_per_s:,.0f} tok/s {r.seconds * 1000:.0f} ms{mfu_txt}{uf_txt}"
                + (OffloadMeter.console(offload) if offload else "")
                + (f" SKIPPED ({self.skipped_steps} total)" if r.skipped else "")
            )

    def train(self) -> dict:
        """Train to `train.train_steps` (from the current step); returns a summary."""
        cfg = self.cfg
        first_val = self.evaluate() if cfg.train.eval_interval else None
        if first_val is not None:
            self.metrics.scalars(self.step, {"val/loss": first_val, "val/ppl": math.exp(min(first_val, 50))})
            self.metrics.line(f"validation at step {self.step}: loss {first_val:.4f} ppl {math.exp(min(first_val, 50)):.1f}")
        losses, times = [], []
        last_val = first_val
        stopped = False
        with self.signals.deferring_interrupt():  # Ctrl-C stops after the step (docs/training.md)
            while self.step < cfg.train.train_steps:
                r = self.train_step()
                losses.append(r.loss)
                times.append(r.seconds)
                self._log_step(r)
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                    last_val = self.evaluate()
                    self.metrics.scalars(self.step, {"val/loss": last_val, "val/ppl": math.exp(min(last_val, 50))})
                    self.metrics.line(f"validation at step {self.step}: loss {last_val:.4f} ppl {math.exp(min(last_val, 50)):.1f}")
                c = cfg.checkpoint
                if self.checkpointer is not None and c.save and c.save_interval and self.step % c.save_interval == 0:
                    self._save()
                stop = self.signals.agreed(self.device)  # every rank stops after the same step
                if stop == signals.INTERRUPT:  # Ctrl-C: no save; cli.run prints the line, exit 130
                    self.metrics.line(f"received {'SIGINT' if self.signals.interrupted else 'SIGINT on another rank'}: "
                                      f"stopping after step {self.step} without saving")
                    self.metrics.close()
                    raise KeyboardInterrupt
                if stop:
                    self.metrics.line(f"received {self.stop_requested or 'a stop signal on another rank'}: stopping after step {self.step}")
                    if self.checkpointer is not None:
                        self._save()
                    stopped = True
                    break
        if not stopped:
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval != 0:
                last_val = self.evaluate()
                if last_val is not None:
                    self.metrics.line(f"validation at step {self.step}: loss {last_val:.4f}")
            if self.checkpointer is not None:
                self._save(final=True)
        steady = times[1:] or times
        tok = cfg.train.global_batch_size * cfg.model.seq_length
        summary = {
            "steps": self.step, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "first_val_loss": first_val, "last_val_loss": last_val, "skipped_steps": self.skipped_steps,
            "tokens_per_s": tok * len(steady) / sum(steady) if steady else None,
            "step_time_s": sum(steady) / len(steady) if steady else None, "tensorboard": self.log_dir,
            "stopped_by": self.stop_requested,
        }
        self.metrics.close()
        return summary
