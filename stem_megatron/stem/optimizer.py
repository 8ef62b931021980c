"""Row-sparse AdamW for STEM tables: only rows touched this step (engine.grad_index) change.

Semantics (a choice, pinned by tests/test_stem_optimizer.py):
- Lazy moments with a per-row step counter. A touched row r does `step[r] += 1`, then the AdamW
  update of torch.optim.AdamW with bias corrections 1 - beta**step[r]. An untouched row, its
  exp_avg, exp_avg_sq and step do not change at all: no moment decay, no momentum drift, no
  weight decay. A row touched in every step therefore follows torch.optim.AdamW exactly; a rare
  token's row sees its k-th update bias-corrected as the k-th, not as the global step.
- Decoupled weight decay on touch: `w *= 1 - lr * weight_decay` for touched rows only (before
  the Adam update, as torch.optim.AdamW). Rows of tokens that never occur keep their init.
- `grad_scale` multiplies the gradient before the moments (global-norm clipping).
Why lazy rather than dense AdamW over the whole table: a dense update costs V x F per step and
moves every row on stale momentum; catch-up of the missed decays needs the lr of every skipped
step. Lazy is the standard sparse-embedding choice (TF LazyAdam, torch SparseAdam), with per-row
steps added so bias correction stays right for rare rows.

State (exp_avg, exp_avg_sq: fp32 [rows_local, L, F]; step: int64 [rows_local]) is sharded exactly
like the engine's rows. Legend: n touched rows, L layers, F local columns.
"""

from __future__ import annotations

import torch

from stem_megatron.stem.engine import StemTableEngine


class RowSparseAdamW:
    def __init__(
        self,
        engines: list[StemTableEngine],
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self.engines = list(engines)
        self.betas, self.eps, self.weight_decay = (
            (float(betas[0]), float(betas[1])),
            float(eps),
            float(weight_decay),
        )
        # The state lives with the rows (engine.row_state(): device memory, or host memory with
        # host tables); these dicts are views of it, for checkpoints.
        self.state = [e.row_state() for e in self.engines]

    def zero_grad(self) -> None:
        for e in self.engines:
            e.zero_grad()

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """AdamW on the touched rows of every engine (after engine.reduce_grads())."""
        beta1, beta2 = self.betas
        for e in self.engines:
            if e.grad_index is None or e.grad_index.numel() == 0:
                # Every rank bumps the version, touched rows or not: rows it prefetched from other owners
                # are stale after their update too, and the staleness check must agree across ranks.
                e.mark_updated()
                continue
            idx_n = e.grad_index
            g_nLF = e.grad_values if grad_scale == 1.0 else e.grad_values * grad_scale
            # Host tables: the touched rows are in the device cache (pinned since their lookup), so
            # the update runs on the device and writes through to the host (row_storage.py).
            w_nLF, m_nLF, v_nLF, step_n = e.read_row_state(idx_n)
            step_n = step_n + 1
            if self.weight_decay:
                w_nLF.mul_(1.0 - lr * self.weight_decay)
            m_nLF.lerp_(g_nLF, 1.0 - beta1)
            v_nLF.mul_(beta2).addcmul_(g_nLF, g_nLF, value=1.0 - beta2)
            steps = step_n.double()
            bc1_n = 1.0 - torch.pow(beta1, steps)
            bc2_sqrt_n = torch.sqrt(1.0 - torch.pow(beta2, steps))
            neg_step_size_n11 = (-lr / bc1_n).float().view(-1, 1, 1)
            denom_nLF = (v_nLF.sqrt() / bc2_sqrt_n.float().view(-1, 1, 1)).add_(self.eps)
            w_nLF.addcdiv_(m_nLF * neg_step_size_n11, denom_nLF)  # the operation order of torch's AdamW
            e.write_row_state(idx_n, w_nLF, m_nLF, v_nLF, step_n)  # bumps the version

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state, with each engine's layout for checking on load."""
        return {
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "engines": [
                {"layout": e.layout.__dict__.copy(), **{k: v for k, v in st.items()}}
                for e, st in zip(self.engines, self.state)
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["engines"]) != len(self.engines):
            raise ValueError(
                f"checkpoint has {len(state['engines'])} STEM engines, this model {len(self.engines)}"
            )
        for e, saved in zip(self.engines, state["engines"]):
            if saved["layout"] != e.layout.__dict__:
                raise ValueError(
                    f"STEM optimizer layout {saved['layout']} does not match {e.layout.__dict__}"
                )
            for k in ("exp_avg", "exp_avg_sq", "step"):
                e.set_rows(k, saved[k])
        self.betas = tuple(state["betas"])
        self.eps, self.weight_decay = state["eps"], state["weight_decay"]
