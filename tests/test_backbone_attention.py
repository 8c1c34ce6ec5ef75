"""The backbone attends exactly as the hybrid mask says.

Changing a token that a position must not see leaves that position's logits
unchanged; changing one it sees changes them (so the test can fail).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlightning.masks import batch_attention_mask
from pdlightning.model.backbone import build_backbone
from pdlightning.tags import CONTROL_NAMES, TagSpec

SPEC = TagSpec().with_ids({n: i for i, n in enumerate(CONTROL_NAMES)})
PO, PC, SO, SC, SY, END, PAD, MASK = range(8)
VOCAB = 40
MODEL = build_backbone(
    config={
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    },
    vocab_size=VOCAB,
).eval()


@st.composite
def sequences(draw: st.DrawFn) -> list[int]:
    word = st.integers(min_value=8, max_value=VOCAB - 1)
    ids = draw(st.lists(word, min_size=1, max_size=4))
    for r in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 3))
        for _ in range(n):
            ids += [PO, draw(word), PC]
        for _ in range(n):
            ids += [SO, *draw(st.lists(word, min_size=1, max_size=3)), SC]
        ids.append(SY if r < 2 and draw(st.booleans()) else END)
    return ids


@settings(max_examples=25, deadline=None)
@given(ids=sequences(), dense=st.booleans(), data=st.data())
def test_changing_an_invisible_token_leaves_logits_unchanged(ids: list[int], dense: bool, data: st.DataObject):
    x = torch.tensor([ids])
    mask = batch_attention_mask(x, SPEC, dense=dense)
    row = data.draw(st.integers(0, len(ids) - 1), label="row")
    col = data.draw(st.integers(0, len(ids) - 1), label="col")
    changed = x.clone()
    changed[0, col] = 8 + (changed[0, col] - 8 + 1) % (VOCAB - 8) if changed[0, col] >= 8 else changed[0, col]
    if torch.equal(changed, x):
        return
    with torch.no_grad():
        a = MODEL(input_ids=x, attention_mask=mask).logits[0, row]
        b = MODEL(input_ids=changed, attention_mask=mask).logits[0, row]
    if mask[0, 0, row, col]:
        # a visible token may change the row; for the row's own token it always does
        if row == col:
            assert not torch.allclose(a, b)
    else:
        assert torch.allclose(a, b, atol=1e-5), f"row {row} changed when invisible column {col} did"


def test_a_local_checkpoint_is_loaded_for_training_with_its_dropout_on(tmp_path):
    """from_pretrained returns eval mode; Lightning keeps module modes, so the builder must not."""
    config = {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": VOCAB, "attention_dropout": 0.5}
    build_backbone(config=config).save_pretrained(tmp_path)
    model = build_backbone(pretrained=str(tmp_path), attn_implementation="eager", vocab_size=VOCAB + 2)
    assert all(m.training for m in model.modules())
    ids = torch.arange(8)[None]
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    assert not torch.allclose(a, b)  # dropout is active
