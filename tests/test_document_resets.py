"""Document resets (`data.reset_attention_mask`, `data.reset_position_ids`): a packed sequence with
resets computes, for every document in it, what the reference computes on that document alone.

Items are made by megatron's own `_get_ltor_masks_and_position_ids` (what `GPTDataset` returns with
the two flags), then go through the trainer's collate, forward step and model. Before the fix the
mask never reached the model (the trainer passed None) and RoPE ignored `position_ids`.

`reset_position_ids` alone is checked too: with the document mask on, RoPE's relative form makes a
position reset change nothing (scores depend only on distances inside one document), so only
positions restarting under the full causal mask show whether RoPE reads `position_ids`. Its
reference is the reference model rotating each token at its restarted position.

Legend: B batch, S sequence, V vocabulary.
"""

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed

EOD = 5
SEQ = 16
# EOD positions per sample: documents of several lengths, one sample without a boundary.
EOD_POSITIONS = [[4, 10], [7], [], [0, 1, 15], [3, 12], [9], [2, 8, 13], [6]]


class PackedDocuments:
    """Fixed token sequences holding several EOD-terminated documents, as GPTDataset items with resets."""

    def __init__(self, reset_attention_mask: bool, reset_position_ids: bool):
        from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

        gen = torch.Generator().manual_seed(0)
        self.items = []
        for eods in EOD_POSITIONS:
            ids = torch.randint(EOD + 1, 40, (SEQ + 1,), generator=gen)
            ids[eods] = EOD
            tokens_S = ids[:-1]
            mask_1SS, loss_mask_S, position_ids_S = _get_ltor_masks_and_position_ids(
                tokens_S, EOD, reset_position_ids, reset_attention_mask, False, reset_attention_mask
            )
            item = {"tokens": tokens_S, "labels": ids[1:], "loss_mask": loss_mask_S, "position_ids": position_ids_S}
            if reset_attention_mask:
                item["attention_mask"] = mask_1SS
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def per_document_logits(ref, tokens_S: torch.Tensor) -> torch.Tensor:
    """[S, V]: the reference run on each document (up to and including its EOD) on its own."""
    ends = (tokens_S == EOD).nonzero().flatten().tolist()
    bounds = [0] + [e + 1 for e in ends if e + 1 < len(tokens_S)] + [len(tokens_S)]
    return torch.cat([ref(tokens_S[a:b][None])[0] for a, b in zip(bounds, bounds[1:])])


RESETS = {  # name: (reset_attention_mask, reset_position_ids)
    "mask_and_positions": (True, True),
    "positions_only": (False, True),
}


def _check_both(rank, world_size, layout):
    """Both reset modes in one process (process start-up dominates these tiny runs)."""
    from megatron.core import parallel_state

    for i, resets in enumerate(RESETS):
        if i:
            parallel_state.destroy_model_parallel()  # the next Trainer initialises its own groups
        _check(rank, world_size, layout, resets)


def _check(rank, world_size, layout, resets):
    import torch.nn.functional as F
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from stem_megatron.testing.models import on_model_device, reference_model, tiny_config
    from stem_megatron.training.batches import collate
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_config(**layout)
    cfg.data.reset_attention_mask, cfg.data.reset_position_ids = RESETS[resets]
    data = PackedDocuments(*RESETS[resets])
    trainer = Trainer(cfg)
    trainer.setup(datasets=(data, None))
    ref = reference_model(cfg, seed=0)
    trainer.load_full_weights(ref.state_dict())
    failures = []
    items = [data[i] for i in range(len(data))]
    with torch.no_grad():
        tokens_BS = torch.stack([it["tokens"] for it in items])
        if cfg.data.reset_attention_mask:  # each document alone
            want_BSV = torch.stack([per_document_logits(ref, it["tokens"]) for it in items])
        else:  # one causal sequence, positions restarting after each EOD
            want_BSV = ref(tokens_BS, position_ids=torch.stack([it["position_ids"] for it in items]))
        plain_BSV = ref(tokens_BS)
        assert ((plain_BSV - want_BSV).norm() / want_BSV.norm()).item() > 1e-2, "resets change nothing here"
        # The model itself, fed like the trainer's forward step; TP ranks hold vocabulary shards.
        batch = on_model_device(collate(items), trainer.chunks[0])
        got_BSV = trainer.chunks[0](batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        got_BSV = gather_from_tensor_model_parallel_region(got_BSV).cpu()
        err = ((got_BSV - want_BSV).norm() / want_BSV.norm()).item()
        if err > 1e-5:
            failures.append(f"packed logits vs reference: rel err {err:.2e}")
        labels_BS = torch.stack([it["labels"] for it in items])
        want_loss = F.cross_entropy(want_BSV.flatten(0, 1), labels_BS.flatten()).item()
    # The trainer's own path: collate -> forward step -> schedule; step 0's loss precedes any update.
    got_loss = trainer.train_step().loss
    if abs(got_loss - want_loss) > 1e-5 * want_loss:
        failures.append(f"training loss {got_loss} vs reference {want_loss}")
    assert not failures, f"layout {layout}, resets {resets}: " + "; ".join(failures)


@pytest.mark.parametrize("name,world,layout", [("tp1", 1, {}), ("tp2_sp", 2, dict(tp=2, sp=True))])
def test_packed_documents_with_resets_match_the_reference(name, world, layout):
    run_distributed(_check_both, world_size=world, args=(layout,), timeout=300)


def test_trainer_datasets_carry_the_document_mask_only_with_reset_attention_mask(tmp_path):
    from fixtures.tiny_tokenizers import make_tiktoken

    from stem_megatron.testing.models import tiny_config
    from stem_megatron.training.trainer import Trainer

    tokenizer = make_tiktoken(str(tmp_path))
    for reset in (False, True):
        cfg = tiny_config(vocab_size=512)
        cfg.data.tokenizer, cfg.data.reset_attention_mask, cfg.data.reset_position_ids = tokenizer, reset, reset
        cfg.data.cache_path = str(tmp_path / f"cache{reset}")
        cfg.train.train_steps, cfg.train.eval_interval = 2, 0
        train, _ = Trainer(cfg)._build_datasets()
        item = train[0]
        assert ("attention_mask" in item) == reset, sorted(item)
        if reset:
            assert item["attention_mask"].shape == (1, SEQ, SEQ) and item["attention_mask"].dtype == torch.bool


def test_document_mask_with_transformer_engine_is_refused(monkeypatch):
    from stem_megatron import model
    from stem_megatron.testing.models import tiny_config

    cfg = tiny_config()
    cfg.data.reset_attention_mask = True
    monkeypatch.setattr(model, "use_transformer_engine", lambda cfg: True)
    with pytest.raises(ValueError, match="reset_attention_mask=true needs model.transformer_impl=local"):
        model.build_model_chunks(cfg)
