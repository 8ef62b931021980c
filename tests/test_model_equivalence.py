"""The megatron STEM model computes the reference function: logits and gradients, every layout.

An independent plain-PyTorch model (stem_megatron/reference.py, no megatron imports) and the
megatron model loaded with the same weights (mapped by name) must give the same logits, loss and
gradients (fp32, relative error <= 1e-5) at TP=1, TP=2, TP=2+SP, PP=2, PP=2+VPP=2 and PP=2 with
full / selective recompute, over several micro-batches (so pipeline schedules interleave the
forward of later micro-batches with the backward of earlier ones).
"""

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed

RTOL = 1e-5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu(), b.detach().cpu()  # the megatron side is on CUDA when run by test_gpu.py
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _check_layout(rank, world_size, layout):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from stem_megatron.convert import (
        load_reference_into_chunks,
        owned_rows,
        reference_tables,
        reference_to_chunk,
    )
    from stem_megatron.model import build_model_chunks, stem_engine_factory
    from stem_megatron.parallel import initialize_model_parallel, parallel_info
    from stem_megatron.testing.models import (
        forward_backward,
        make_batches,
        pipeline_logits,
        reference_model,
        tiny_config,
    )

    cfg = tiny_config(**layout)
    initialize_model_parallel(cfg)
    info = parallel_info()
    chunks = build_model_chunks(cfg, stem_engine_factory(cfg))
    ref = reference_model(cfg, seed=0)
    load_reference_into_chunks(chunks, ref.state_dict(), cfg)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    ddp = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    batches = make_batches(cfg, num_microbatches=4)

    # Reference: token-mean loss over all micro-batches, plain autograd.
    ref_losses = [ref.loss(b["tokens"], b["labels"]) for b in batches]
    ref_loss = torch.stack(ref_losses).mean()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    logits = pipeline_logits(ddp, cfg, batches)
    loss = forward_backward(ddp, cfg, batches)
    finalize_model_grads(ddp)
    failures = []
    if logits is not None:
        with torch.no_grad():
            for b, got in zip(batches, logits):
                want = ref(b["tokens"])
                if _rel_err(got, want) > RTOL:
                    failures.append(f"logits rel err {_rel_err(got, want):.2e}")
        if abs(loss - ref_loss.item()) > RTOL * abs(ref_loss.item()):
            failures.append(f"loss {loss} vs reference {ref_loss.item()}")
    for chunk in chunks:
        tcfg = chunk.config
        want = reference_to_chunk(
            ref_grads, cfg, tp_rank=info.tp_rank, tp_size=info.tp_size,
            layer_offset=get_transformer_layer_offset(tcfg, vp_stage=chunk.vp_stage),
            num_local_layers=get_num_layers_to_build(tcfg, vp_stage=chunk.vp_stage),
            pre_process=chunk.pre_process, post_process=chunk.post_process,
        )
        for name, p in chunk.named_parameters():
            got = p.main_grad
            err = _rel_err(got, want[name])
            if err > RTOL:
                failures.append(f"grad {name} (vp {chunk.vp_stage}) rel err {err:.2e}")
        engine = chunk.stem_engine
        if engine is not None:
            engine.reduce_grads()
            layer_ids = sorted(chunk.stem_slot_of_layer, key=chunk.stem_slot_of_layer.get)
            want_local = owned_rows(engine, reference_tables(ref_grads, layer_ids, info.tp_rank, info.tp_size))
            got_local = torch.zeros_like(engine.weight)  # on the engine's device, like grad_index
            got_local[engine.grad_index] = engine.grad_values
            # megatron's per-token loss sum is divided by tokens * micro-batches in the schedule
            # for dense grads; the engine's row grads are raw sums of the same scaled loss.
            err = _rel_err(got_local, want_local)
            if err > RTOL:
                failures.append(f"table grads of layers {layer_ids} rel err {err:.2e}")
    assert not failures, f"layout {layout}, rank {rank}: " + "; ".join(failures)


LAYOUTS = {
    "tp1": (1, dict()),
    "tp2": (2, dict(tp=2)),
    "tp2_sp": (2, dict(tp=2, sp=True)),
    "pp2": (2, dict(pp=2)),
    "pp2_vpp2": (2, dict(pp=2, vpp=2)),
    "pp2_full_recompute": (2, dict(pp=2, recompute="full")),
    "pp2_vpp2_full_recompute": (2, dict(pp=2, vpp=2, recompute="full")),
    "pp2_selective_recompute": (2, dict(pp=2, recompute="selective")),
    "pp2_deterministic": (2, dict(pp=2, deterministic=True)),
    "tp2_untied_dense": (2, dict(tp=2, tie_embeddings=False, stem_layers=None)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_megatron_model_matches_reference(name):
    world, layout = LAYOUTS[name]
    run_distributed(_check_layout, world_size=world, args=(layout,), timeout=240)
