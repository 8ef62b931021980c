"""Knowledge editing on hand-made rows: each mode's documented override, bitwise-unchanged logits
before the edited span, `stem_ids = ids` is the unedited model, continuations keep the edit, and
the reference's overrides equal a table lookup at other ids.
"""

import pytest
import torch

from stem_megatron import editing
from stem_megatron.testing.models import reference_model, tiny_config

SOURCE = [10, 11, 12]
PROMPT = [1, 10, 11, 12, 5, 10, 11, 12, 7, 8]  # the source twice: the last occurrence starts at 5


@pytest.fixture(scope="module")
def model():
    """Random tiny reference (layers 1, 2 STEM); table row v of STEM layer l is constant v + 1000 l."""
    m = reference_model(tiny_config(), seed=0).eval()
    with torch.no_grad():
        for layer in m.config.stem_layers:
            table_vf = editing.stem_table(m, layer)
            table_vf.copy_((torch.arange(table_vf.shape[0]).float() + 1000 * layer)[:, None].expand_as(table_vf))
    return m


def _row_values(model, plan, layer):
    rows_nf = editing.span_rows(model, plan, layer)
    assert (rows_nf == rows_nf[:, :1]).all()  # constant rows: one value per position
    return (rows_nf[:, 0] - 1000 * layer).tolist()


@pytest.mark.parametrize("mode,target,want", [
    ("one_to_one", [20, 21, 22], [20, 21, 22]),
    ("average", [20, 30], [25, 25, 25]),
    ("average", [20, 21, 22, 23, 24], [22, 22, 22]),
    ("copy", [20, 21], [20, 21, 20]),
    ("copy", [20, 21, 22, 23], [20, 21, 22]),
    ("left_pad", [20, 21], [10, 20, 21]),  # padding keeps the source's own row
    ("left_pad", [20, 21, 22, 23], [21, 22, 23]),  # truncated on the left
    ("right_pad", [20, 21], [20, 21, 12]),
    ("right_pad", [20, 21, 22, 23], [20, 21, 22]),  # truncated on the right
    ("auto", [20, 21, 22], [20, 21, 22]),  # equal lengths: one_to_one
    ("auto", [20, 30], [25, 25, 25]),  # otherwise average
])
def test_each_mode_gives_its_documented_override(model, mode, target, want):
    plan = editing.plan_edit(PROMPT, SOURCE, target, mode)
    assert (plan.start, plan.end) == (5, 8)
    assert plan.resolved_mode == (mode if mode != "auto" else ("one_to_one" if len(target) == 3 else "average"))
    for layer in model.config.stem_layers:
        assert _row_values(model, plan, layer) == want
    overrides = editing.row_overrides(model, plan, [2], len(PROMPT))
    mask_bs, rows_nf = overrides[2]
    assert set(overrides) == {2} and mask_bs[0].nonzero().flatten().tolist() == [5, 6, 7]
    assert rows_nf.shape == (3, model.config.ffn_hidden_size)


def test_plan_errors_are_one_line():
    with pytest.raises(editing.EditError, match="does not occur"):
        editing.plan_edit(PROMPT, [10, 12], [20, 21], "average")
    with pytest.raises(editing.EditError, match="one_to_one needs as many target tokens"):
        editing.plan_edit(PROMPT, SOURCE, [20, 21], "one_to_one")
    with pytest.raises(editing.EditError, match="unknown --mode"):
        editing.plan_edit(PROMPT, SOURCE, [20], "shuffle")
    with pytest.raises(editing.EditError, match="needs --mode one_to_one"):
        editing.persisted_state(None, editing.plan_edit(PROMPT, SOURCE, [20], "average"), [1])


def test_logits_before_the_span_are_bitwise_unchanged(model):
    plan = editing.plan_edit(PROMPT, SOURCE, [40, 41, 42], "one_to_one")
    before_sv = editing.logits(model, PROMPT)
    after_sv = editing.logits(model, PROMPT, editing.row_overrides(model, plan, [1, 2], len(PROMPT)))
    assert torch.equal(after_sv[:plan.start], before_sv[:plan.start])
    for p in range(plan.start, len(PROMPT)):  # the edit reaches the span and everything after it
        assert not torch.equal(after_sv[p], before_sv[p]), p


def test_stem_ids_equal_to_ids_is_the_unedited_model(model):
    ids_bs = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        assert torch.equal(model(ids_bs, stem_ids=ids_bs.clone()), model(ids_bs))


def test_overrides_equal_a_table_lookup_at_other_ids(model):
    """one_to_one in every STEM layer is exactly reading the tables at the target's ids."""
    plan = editing.plan_edit(PROMPT, SOURCE, [40, 41, 42], "one_to_one")
    stem_ids = list(PROMPT)
    stem_ids[5:8] = [40, 41, 42]
    with torch.no_grad():
        by_ids = model(torch.tensor([PROMPT]), stem_ids=torch.tensor([stem_ids]))[0]
    by_rows = editing.logits(model, PROMPT, editing.row_overrides(model, plan, [1, 2], len(PROMPT)))
    assert torch.equal(by_ids, by_rows)
    assert not torch.equal(by_ids, editing.logits(model, PROMPT))


def test_reference_rejects_bad_stem_inputs(model):
    ids_bs = torch.tensor([PROMPT])
    with pytest.raises(ValueError, match="must have the shape"):
        model(ids_bs, stem_ids=ids_bs[:, :-1])
    mask_bs = torch.zeros_like(ids_bs, dtype=torch.bool)
    with pytest.raises(ValueError, match="not STEM layers"):
        model(ids_bs, row_overrides={0: (mask_bs, torch.zeros(0, model.config.ffn_hidden_size))})


def test_continuation_keeps_the_edit():
    """Each generated token equals the greedy token of the whole sequence read with the edited ids."""
    model = reference_model(tiny_config(), seed=3).eval()  # random N(0, 1) tables: the edit shows
    plan = editing.plan_edit(PROMPT, SOURCE, [40, 41, 42], "one_to_one")
    vocab = model.config.table_vocab_size
    got = editing.generate(model, PROMPT, 6, vocab, editing.row_overrides(model, plan, [1, 2], len(PROMPT)))
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(6):
            stem_ids = list(ids)
            stem_ids[5:8] = [40, 41, 42]
            ids.append(int(model(torch.tensor([ids]), stem_ids=torch.tensor([stem_ids]))[0, -1, :vocab].argmax()))
    assert got == ids[len(PROMPT):]
    # and the edit still changes the last generated position's logits (it is not only the prompt's)
    overrides = editing.row_overrides(model, plan, [1, 2], len(PROMPT))
    assert not torch.equal(editing.logits(model, ids, overrides)[-1], editing.logits(model, ids)[-1])


def test_persisted_state_moves_rows_and_rejects_conflicts(model):
    plan = editing.plan_edit(PROMPT, SOURCE, [11, 10, 50], "one_to_one")  # swaps 10 <-> 11, 12 -> 50
    state, changed = editing.persisted_state(model, plan, [2])
    table = state["model.layers.2.mlp.stem_table.weight"][:, 0] - 2000
    assert table[[10, 11, 12, 50]].tolist() == [11, 10, 50, 50] and changed == [10, 11, 12]
    assert torch.equal(state["model.layers.1.mlp.stem_table.weight"], editing.stem_table(model, 1))
    clash = editing.plan_edit([3, 10, 10], [10, 10], [20, 21], "one_to_one")
    with pytest.raises(editing.EditError, match="two target tokens"):
        editing.persisted_state(model, clash, [1])


def test_check_layers(model):
    assert editing.check_layers(model, None) == [1, 2]
    with pytest.raises(editing.EditError, match=r"--layers \[0\] are not STEM layers"):
        editing.check_layers(model, [0, 1])
    dense = reference_model(tiny_config(stem_layers=None), seed=0)
    with pytest.raises(editing.EditError, match="no STEM layers"):
        editing.check_layers(dense, None)
