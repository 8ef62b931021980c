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

import functools

import torch

from stem_megatron.stem.engine import StemTableEngine


def adamw_rows(w_nLF, m_nLF, v_nLF, step_n, g_nLF, *, lr, betas, eps, weight_decay, grad_scale):
    """One lazy AdamW update of n rows (in place on w, m, v; returns them and the new steps).

    Element-wise except the per-row bias corrections, so any split of the rows into chunks gives
    the same bits. Temporaries: the scaled gradient, the denominator and the step term
    (device_budget.UPDATE_CHUNK_BUFFERS counts them with w, m, v and g).
    """
    beta1, beta2 = betas
    g_nLF = g_nLF if grad_scale == 1.0 else g_nLF * grad_scale
    step_n = step_n + 1
    if weight_decay:
        w_nLF.mul_(1.0 - lr * weight_decay)
    m_nLF.lerp_(g_nLF, 1.0 - beta1)
    v_nLF.mul_(beta2).addcmul_(g_nLF, g_nLF, value=1.0 - beta2)
    steps = step_n.double()
    bc1_n = 1.0 - torch.pow(beta1, steps)
    bc2_sqrt_n = torch.sqrt(1.0 - torch.pow(beta2, steps))
    neg_step_size_n11 = (-lr / bc1_n).float().view(-1, 1, 1)
    denom_nLF = (v_nLF.sqrt() / bc2_sqrt_n.float().view(-1, 1, 1)).add_(eps)
    w_nLF.addcdiv_(m_nLF * neg_step_size_n11, denom_nLF)  # the operation order of torch's AdamW
    return w_nLF, m_nLF, v_nLF, step_n


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
        fn = functools.partial(adamw_rows, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                               grad_scale=grad_scale)
        for e in self.engines:
            # Device tables: one piece on the device. Host tables: chunks, streamed through the device
            # or on the host (row_storage.HostRows.update). Every rank bumps the version.
            e.apply_update(fn)

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
