"""The backbone attends exactly as the hybrid mask says.

Changing a token that a position must not see leaves that position's logits
unchanged; changing one it sees changes them (so the test can fail).
"""

from __future__ import annotations

import pytest
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
    rounds = draw(st.integers(1, 3))
    for r in range(rounds):
        n = draw(st.integers(1, 3))
        for _ in range(n):
            ids += [PO, draw(word), PC]
        for _ in range(n):
            ids += [SO, *draw(st.lists(word, min_size=1, max_size=3)), SC]
        # rounds are separated by <sync/>; the end tag ends the response (the grammar refuses
        # anything after it: with a plan after an end tag, dense spans would reach it through
        # the next round's spans, a path no valid layout has)
        ids.append(SY if r < rounds - 1 or draw(st.booleans()) else END)
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


FLEX_CONFIG = {  # head_dim 16: the smallest flex's CPU kernels are happy with
    "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}
FLEX_IDS = torch.tensor([
    [9, 10, 11, PO, 12, PC, PO, 13, PC, SO, 14, 15, SC, SO, 16, SC, SY, PO, 17, PC, SO, 18, SC, END],
    [9, 10, PO, 12, PC, SO, 13, 14, 15, 16, SC, SY, PO, 19, PC, PO, 20, PC, SO, 9, SC, SO, 8, SC],
])


def _twins(device: str = "cpu"):
    sdpa = build_backbone(config=FLEX_CONFIG, vocab_size=VOCAB).to(device)
    flex = build_backbone(config=FLEX_CONFIG, vocab_size=VOCAB, attn_implementation="flex_attention").to(device)
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def test_the_hybrid_mask_as_a_block_mask_attends_as_the_bool_mask_does():
    """flex takes the hybrid mask as a BlockMask (a bool tensor would be added to its scores).

    Eager flex, torch's reference implementation and correct on CPU, against
    sdpa with the bool mask: the shapes of a prefill and of a cached extension
    step (fewer queries than keys), sparse and dense.
    """
    from torch.nn.attention.flex_attention import flex_attention

    from pdlightning.masks import block_mask

    torch.manual_seed(0)
    cut = 16
    for dense in (False, True):
        full = batch_attention_mask(FLEX_IDS, SPEC, dense=dense)
        for mask in (full[:, :, :cut, :cut], full[:, :, cut:, :]):
            b, _, q, k = mask.shape
            qs, ks, vs = torch.randn(b, 4, q, 16), torch.randn(b, 4, k, 16), torch.randn(b, 4, k, 16)
            want = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            got = flex_attention(qs, ks, vs, block_mask=block_mask(mask))
            assert torch.allclose(got, want, atol=1e-5), f"dense={dense}, {q} queries: flex and sdpa disagree"


def test_flex_attention_is_refused_on_cpu_before_anything_is_loaded():
    """transformers runs flex compiled; torch's compiled CPU kernel returned NaN on an AVX2 machine."""
    from pdlightning.decoding.lm import LanguageModel
    from pdlightning.masks import for_attention

    with pytest.raises(ValueError, match="flex_attention.*GPUs.*'sdpa' on CPU"):
        for_attention(batch_attention_mask(FLEX_IDS, SPEC), "flex_attention")
    with pytest.raises(ValueError, match="flex_attention.*GPUs"):  # before looking for the directory
        LanguageModel.from_pretrained("no/such/dir", device="cpu", attn_implementation="flex_attention")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention runs on GPUs only")
def test_flex_attention_decodes_as_sdpa_does_under_the_hybrid_mask():
    """A prefill and one cached extension step, sparse and dense, through the
    decoders' own forward (:meth:`LanguageModel.forward`)."""
    from pdlightning.decoding.lm import LanguageModel

    models = [LanguageModel(m, None, SPEC) for m in _twins("cuda")]
    ids = FLEX_IDS.cuda()
    pos = torch.arange(ids.shape[1], device="cuda").expand(2, -1)
    cut = 16
    for dense in (False, True):
        mask = batch_attention_mask(ids, SPEC, dense=dense)
        out = []
        for lm in models:
            cache = lm.new_cache()
            first = lm.forward(ids[:, :cut], mask[:, :, :cut, :cut], pos[:, :cut], cache, use_cache=True)
            then = lm.forward(ids[:, cut:], mask[:, :, cut:, :], pos[:, cut:], first.past_key_values)
            out.append(torch.cat([first.logits, then.logits], 1))
        assert torch.allclose(out[0], out[1], atol=1e-4), f"dense={dense}: flex and sdpa disagree"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention trains on GPUs only (no CPU backward)")
def test_flex_attention_trains_as_sdpa_does_under_the_hybrid_mask():
    from pdlightning.masks import batch_attention_mask, for_attention

    sdpa, flex = _twins("cuda")
    ids = FLEX_IDS.cuda()
    mask = batch_attention_mask(ids, SPEC)
    for m in (sdpa, flex):
        logits = m(input_ids=ids, attention_mask=for_attention(mask, m.config._attn_implementation)).logits
        logits.float().square().mean().backward()
    for (name, a), b in zip(sdpa.named_parameters(), flex.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-4), name


def test_flash_attention_is_refused_with_the_reason(tmp_path):
    from pdlightning.decoding.lm import LanguageModel

    with pytest.raises(ValueError, match="flash_attention_2.*hybrid attention mask.*flex_attention"):
        build_backbone(config=FLEX_CONFIG, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="flash_attention_2.*hybrid attention mask"):
        LanguageModel.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_a_directory_without_a_model_names_the_model_directories_under_it(tmp_path):
    from pdlightning.decoding.lm import LanguageModel

    run = tmp_path / "run"
    (run / "planned" / "version_0" / "hf").mkdir(parents=True)
    (run / "planned" / "version_0" / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*run/planned/version_0/hf"):
        LanguageModel.from_pretrained(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json\)\. Training writes"):  # nothing to name
        LanguageModel.from_pretrained(tmp_path / "empty")
