"""The STEM MLP on hand-made inputs: W_down(SiLU(W_gate x) * E[ids]), and row locality."""

import torch
import torch.nn.functional as F

from stem_megatron.testing.distributed import run_distributed


def _check(rank, world_size):
    from megatron.core.transformer.spec_utils import build_module

    from stem_megatron.model import _stem_mlp_spec, transformer_config
    from stem_megatron.parallel import initialize_model_parallel
    from stem_megatron.stem.engine import StemLookup
    from stem_megatron.stem.microbatch import MicroBatchRows, StemContext
    from stem_megatron.testing.models import tiny_config

    cfg = tiny_config()
    initialize_model_parallel(cfg)
    tcfg = transformer_config(cfg)
    rows_source = MicroBatchRows()
    spec = _stem_mlp_spec(use_te=False)
    spec.params = {"rows": rows_source}
    mlp = build_module(spec, config=tcfg)
    mlp.set_layer_number(2)  # global layer index 1
    h, f, s, b, v = tcfg.hidden_size, tcfg.ffn_hidden_size, 6, 2, 10
    gen = torch.Generator().manual_seed(0)
    w_gate = torch.randn(f, h, generator=gen)
    w_down = torch.randn(h, f, generator=gen)
    table = torch.randn(v, f, generator=gen)
    with torch.no_grad():
        mlp.linear_fc1.weight.copy_(w_gate)
        mlp.linear_fc2.weight.copy_(w_down)
    x_sbh = torch.randn(s, b, h, generator=gen)
    ids_bs = torch.tensor([[1, 2, 3, 1, 4, 5], [5, 5, 6, 7, 8, 1]])

    def run(table_vf):
        uniq, inv = torch.unique(ids_bs, return_inverse=True)
        rows = table_vf[uniq].unsqueeze(1)  # [U, L=1, f]
        lookup = StemLookup(rows, inv, uniq, stats={}, deterministic=False)
        rows_source.use(StemContext(lookup=lookup, slot_of_layer={1: 0}))
        out, bias = mlp(x_sbh)
        assert bias is None
        return out

    got = run(table)
    want = (F.silu(x_sbh @ w_gate.t()) * table[ids_bs.t()]) @ w_down.t()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()

    # Changing row E[t] changes the output exactly at the positions holding token t.
    t = 5
    edited = table.clone()
    edited[t] += 1.0
    changed_sb = (run(edited) - got).abs().amax(-1) > 1e-6
    assert torch.equal(changed_sb, (ids_bs == t).t()), (changed_sb, ids_bs)


def test_stem_mlp_computes_the_formula_and_rows_are_local():
    run_distributed(_check, world_size=1, timeout=120)
