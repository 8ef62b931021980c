"""`StemGPTModel.forward(..., stem_ids=...)`: with stem_ids = input_ids the logits are exactly the
unedited ones; with other stem_ids they are the reference's `forward(ids, stem_ids=...)` (fp32,
relative error <= 1e-5). Two data-parallel ranks, so the tables are sharded and the rows of the
stem_ids (not the input ids) travel through the table exchange.
"""

import torch

from stem_megatron.testing.distributed import run_distributed


def _check(rank, world_size):
    from stem_megatron.convert import load_reference_into_chunks
    from stem_megatron.model import build_model_chunks, stem_engine_factory
    from stem_megatron.parallel import initialize_model_parallel
    from stem_megatron.testing.models import make_batches, reference_model, tiny_config

    cfg = tiny_config()
    initialize_model_parallel(cfg)
    (chunk,) = build_model_chunks(cfg, stem_engine_factory(cfg))
    ref = reference_model(cfg, seed=0)
    load_reference_into_chunks([chunk], ref.state_dict(), cfg)
    chunk.eval()
    batch = make_batches(cfg, 1, seed=7 + rank)[0]  # each rank its own ids
    ids_bs, pos_bs = batch["tokens"], batch["position_ids"]
    stem_ids_bs = ids_bs.clone()
    stem_ids_bs[:, 3:6] = torch.tensor([41, 42, 43])  # ids absent from make_batches' range (< 40)
    with torch.no_grad():
        plain = chunk(ids_bs, pos_bs, None)
        same = chunk(ids_bs, pos_bs, None, stem_ids=ids_bs.clone())
        edited = chunk(ids_bs, pos_bs, None, stem_ids=stem_ids_bs)
        want = ref(ids_bs, stem_ids=stem_ids_bs)
    assert torch.equal(same, plain), "stem_ids = input_ids changed the logits"
    rel = ((edited - want).norm() / want.norm()).item()
    assert rel <= 1e-5, f"rank {rank}: edited logits vs reference rel err {rel:.2e}"
    assert torch.equal(edited[:, :3], plain[:, :3]) and not torch.allclose(edited[:, 3:], plain[:, 3:])


def test_megatron_model_reads_the_tables_at_stem_ids():
    run_distributed(_check, world_size=2, timeout=240)
