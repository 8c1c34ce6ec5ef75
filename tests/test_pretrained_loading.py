"""Loading real checkpoints: a Dream-like model whose own code registers only
``AutoModel``, vocabularies padded past the tokenizer, and FSDP units that follow
the loaded model's ``_no_split_modules``. Nothing downloads: the stand-in
checkpoint is written here, code included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pdlightning.decoding.lm import LanguageModel
from pdlightning.masks import batch_attention_mask
from pdlightning.model.backbone import build_backbone
from pdlightning.tags import TagSpec
from pdlightning.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Name: Ann Lee\nAge: 31", "Ann is 31 years old. She lives in Paris."] * 20
PAD_ROWS = 8  # Dream (like Qwen2.5) has more embedding rows than its tokenizer has tokens
QWEN2 = {"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}

# A Dream-like checkpoint's code: its own config type, a decoder layer class of its own
# (Dream's DreamDecoderLayer is no Qwen2DecoderLayer), and the LM head on the class that
# AutoModel maps to. The classes derive from transformers' Qwen2 ones to stay short.
CONFIGURATION_X = '''from transformers import Qwen2Config


class XConfig(Qwen2Config):
    model_type = "x_dream"
'''
MODELING_X = '''import torch
from transformers import Qwen2ForCausalLM, Qwen2Model
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2PreTrainedModel, Qwen2RMSNorm

from .configuration_x import XConfig


class XDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = Qwen2Attention(config=config, layer_idx=layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        attended, _ = self.self_attn(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                     position_embeddings=position_embeddings, **kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class XBaseModel(Qwen2Model):
    config_class = XConfig
    _no_split_modules = ["XDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.layers = torch.nn.ModuleList(XDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class XModel(Qwen2ForCausalLM):
    config_class = XConfig
    _no_split_modules = ["XDecoderLayer"]

    def __init__(self, config):
        Qwen2PreTrainedModel.__init__(self, config)
        self.model = XBaseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
'''


def _tokenizer():
    return build_tokenizer(TEXTS, TagSpec(), vocab_size=300)


def _dream_like(directory: Path, vocab_size: int, automodel: str = "XModel") -> Path:
    """Write a checkpoint as Dream ships one: config.json whose auto_map has only AutoConfig and AutoModel."""
    from transformers import AutoConfig, AutoModel

    directory.mkdir(parents=True)
    (directory / "configuration_x.py").write_text(CONFIGURATION_X)
    (directory / "modeling_x.py").write_text(MODELING_X)
    config = {**QWEN2, "model_type": "x_dream", "architectures": [automodel], "vocab_size": vocab_size,
              "tie_word_embeddings": False,
              "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModel": f"modeling_x.{automodel}"}}
    (directory / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    AutoModel.from_config(cfg, trust_remote_code=True).save_pretrained(directory)
    tokenizer, _ = _tokenizer()
    tokenizer.save_pretrained(directory)  # no tag_spec.json: a stock checkpoint
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel"}, auto_map  # as Dream's config.json
    return directory


@pytest.fixture(scope="module")
def dream(tmp_path_factory) -> Path:
    return _dream_like(tmp_path_factory.mktemp("ckpt") / "dream", len(_tokenizer()[0]) + PAD_ROWS)


def _plain(directory: Path, vocab_size: int) -> Path:
    """A plain transformers checkpoint (no auto_map), untied head, rows padded past the tokenizer."""
    model = build_backbone(config={**QWEN2, "tie_word_embeddings": False}, vocab_size=vocab_size)
    model.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------- which class loads


def test_the_auto_class_follows_what_the_config_registers(dream: Path, tmp_path: Path):
    from transformers import AutoModel, AutoModelForCausalLM

    from pdlightning.model.backbone import model_class

    assert model_class(dream, trust_remote_code=True) is AutoModel  # Dream: DreamModel has the head
    # a model transformers knows keeps AutoModelForCausalLM: AutoModel would be its headless base model
    plain = _plain(tmp_path / "plain", 64)
    assert model_class(plain) is AutoModelForCausalLM
    assert type(build_backbone(pretrained=str(plain))).__name__ == "Qwen2ForCausalLM"


def test_a_checkpoint_whose_code_registers_only_automodel_loads_for_training_and_decoding(dream: Path):
    n_tokens = len(_tokenizer()[0])
    model = build_backbone(pretrained=str(dream), trust_remote_code=True, vocab_size=n_tokens)
    assert type(model).__name__ == "XModel" and model.training
    assert model(input_ids=torch.arange(5)[None]).logits.shape == (1, 5, n_tokens + PAD_ROWS)

    lm = LanguageModel.from_pretrained(dream, trust_remote_code=True)
    ids = torch.arange(6)[None]
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    out = lm.forward(ids, mask, torch.arange(6)[None])
    assert type(lm.backbone).__name__ == "XModel" and out.logits.shape == (1, 6, n_tokens + PAD_ROWS)


def test_without_trust_remote_code_the_refusal_is_one_line_saying_to_set_it(dream: Path):
    for load in (lambda: build_backbone(pretrained=str(dream)), lambda: LanguageModel.from_pretrained(dream)):
        with pytest.raises(ValueError, match="ships its own modelling code.*set trust_remote_code") as e:
            load()
        assert "\n" not in str(e.value) and str(dream) in str(e.value)


def test_automodel_giving_a_model_without_logits_is_refused_naming_what_is_missing(tmp_path: Path):
    headless = _dream_like(tmp_path / "headless", 64, automodel="XBaseModel")
    with pytest.raises(ValueError, match=r"AutoModel builds XBaseModel, which returns \w+ without logits") as e:
        build_backbone(pretrained=str(headless), trust_remote_code=True)
    assert "\n" not in str(e.value) and str(headless) in str(e.value)


# ----------------------------------------------------------------------------- vocabulary: grow only


def test_a_pretrained_embedding_matrix_larger_than_the_tokenizer_is_kept_whole(tmp_path: Path):
    """Qwen2.5 and Dream pad their matrices to 152064 rows, past the tokenizer's length."""
    plain = _plain(tmp_path / "plain", 64)
    saved = build_backbone(pretrained=str(plain)).state_dict()
    kept = build_backbone(pretrained=str(plain), vocab_size=50)
    assert kept.get_input_embeddings().num_embeddings == 64
    assert torch.equal(kept.get_input_embeddings().weight, saved["model.embed_tokens.weight"])
    assert torch.equal(kept.get_output_embeddings().weight, saved["lm_head.weight"])
    grown = build_backbone(pretrained=str(plain), vocab_size=70)  # tags added past the padding: grown
    assert grown.get_input_embeddings().num_embeddings == 70
    assert torch.equal(grown.get_input_embeddings().weight[:64], saved["model.embed_tokens.weight"])
    # a model built from a config is sized exactly, whatever the config says
    assert build_backbone(config={**QWEN2, "vocab_size": 64}, vocab_size=50).get_input_embeddings().num_embeddings == 50


# ----------------------------------------------------------------------------- the training module


def _module(dream: Path):
    from pdlightning.model.module import BackboneConfig, PlannedDiffusionModule

    tokenizer, spec = _tokenizer()
    torch.manual_seed(0)
    backbone = BackboneConfig(pretrained=str(dream), trust_remote_code=True)
    return PlannedDiffusionModule(tokenizer=tokenizer, spec=spec, backbone=backbone)


def test_the_training_module_trains_and_exports_a_dream_like_checkpoint(dream: Path, tmp_path: Path):
    """base_model, get_output_embeddings, the 4D boolean mask and the padded vocabulary, then decoding."""
    from pdlightning.data.collate import collate

    module = _module(dream)
    tok, spec = module.tokenizer, module.spec
    assert module.backbone.get_input_embeddings().num_embeddings == len(tok) + PAD_ROWS  # not shrunk
    assert module._head_is_separable()  # lm_head(base_model(...).last_hidden_state), as for Dream

    prompt = tok.encode("Name: Ann Lee\nAge: 31\n", add_special_tokens=False)
    words = tok.encode("Ann is 31 years old.", add_special_tokens=False)
    po, pc, so, sc = (spec.id(n) for n in ("plan_open", "plan_close", "span_open", "span_close"))
    response = [po, *words[:1], pc, so, *words, sc, spec.id("end")]
    batch = collate([prompt] * 2, [response] * 2, spec, "planned")
    terms = module.loss_terms(batch, torch.Generator().manual_seed(0))
    terms.loss.backward()
    assert terms.masked_count > 0 and torch.isfinite(terms.loss)
    assert module.backbone.get_input_embeddings().weight.grad.abs().sum() > 0

    # the hybrid mask reaches the model's attention: the end token does not see the span before
    # it (no <sync/> between), and a span's first word sees its last one (bidirectional)
    module.backbone.eval()
    ids = batch.input_ids[:1]
    mask = batch_attention_mask(ids, spec)
    end, last, first = len(ids[0]) - 1, len(ids[0]) - 3, len(prompt) + 4
    assert not mask[0, 0, end, last] and mask[0, 0, first, last]
    changed = ids.clone()
    changed[0, last] = words[0] if ids[0, last] != words[0] else words[1]
    with torch.no_grad():
        a, b = module(ids, mask)[0], module(changed, mask)[0]
    assert torch.allclose(a[end], b[end], atol=1e-5)
    assert not torch.allclose(a[first], b[first], atol=1e-5)

    exported = module.export(str(tmp_path / "hf"))  # save_pretrained copies the code and its auto_map
    lm = LanguageModel.from_pretrained(exported, trust_remote_code=True)
    assert type(lm.backbone).__name__ == "XModel" and lm.spec.ids == spec.ids


# ----------------------------------------------------------------------------- FSDP units


class _Holder(torch.nn.Module):
    """What FSDP wraps: the LightningModule, the backbone one of its children."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(2, 2)  # modules of the LightningModule's own are left alone


def _tiny_qwen2() -> torch.nn.Module:
    return build_backbone(config=QWEN2, vocab_size=40)


def test_the_wrap_policy_selects_the_decoder_layers_the_loaded_model_names(dream: Path):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from pdlightning.model.fsdp import NoSplitModulesPolicy

    for backbone, layer in ((_tiny_qwen2(), "Qwen2DecoderLayer"),
                            (build_backbone(pretrained=str(dream), trust_remote_code=True), "XDecoderLayer")):
        root = _Holder(backbone)
        chosen = NoSplitModulesPolicy()._run_policy(root, set(), {"k": 1})
        assert set(chosen) == set(backbone.model.layers) and len(chosen) == 2
        assert {type(m).__name__ for m in chosen} == {layer}
        assert all(kwargs == {"k": 1} for kwargs in chosen.values())
    # the old config's class list matches nothing in a model with its own layer class: one FSDP unit
    assert ModuleWrapPolicy({Qwen2DecoderLayer})._run_policy(root, set(), {}) == {}


def test_lightnings_activation_checkpointing_with_the_policy_wraps_each_layer_and_keeps_the_outputs(dream: Path):
    """Lightning's own set-up, which calls the policy module by module (FSDP itself needs GPUs)."""
    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from pdlightning.model.fsdp import NoSplitModulesPolicy

    for backbone, layer in ((_tiny_qwen2(), "Qwen2DecoderLayer"),
                            (build_backbone(pretrained=str(dream), trust_remote_code=True), "XDecoderLayer")):
        strategy = FSDPStrategy(auto_wrap_policy=NoSplitModulesPolicy(),
                                activation_checkpointing_policy=NoSplitModulesPolicy())
        assert isinstance(strategy.kwargs["auto_wrap_policy"], NoSplitModulesPolicy)
        ids = torch.arange(7)[None]
        before = backbone(input_ids=ids).logits.detach()
        root = _Holder(backbone)
        _setup_activation_checkpointing(root, strategy._activation_checkpointing_kwargs)
        wrapped = [m for m in root.modules() if isinstance(m, CheckpointWrapper)]
        assert [type(m._checkpoint_wrapped_module).__name__ for m in wrapped] == [layer, layer]
        assert all(isinstance(m, CheckpointWrapper) for m in backbone.model.layers)
        logits = backbone(input_ids=ids).logits
        assert torch.allclose(logits, before, atol=1e-6)
        logits.square().mean().backward()
        assert backbone.model.layers[0]._checkpoint_wrapped_module.mlp.up_proj.weight.grad is not None


def test_a_model_that_declares_no_split_modules_is_refused_rather_than_wrapped_whole():
    from pdlightning.model.fsdp import NoSplitModulesPolicy

    with pytest.raises(ValueError, match=r"no model inside Sequential declares _no_split_modules") as e:
        NoSplitModulesPolicy()._run_policy(torch.nn.Sequential(torch.nn.Linear(2, 2)), set(), {})
    assert "\n" not in str(e.value)


def test_the_dream_config_wraps_and_checkpoints_the_layers_the_model_names_once():
    from pdlightning.cli import parse_config

    path = ROOT / "configs/dream7b.yaml"
    parsed = parse_config(["--config", str(path)])
    init = parsed.trainer.strategy.init_args
    policy = "pdlightning.model.fsdp.NoSplitModulesPolicy"
    assert init.auto_wrap_policy.class_path == policy
    assert init.activation_checkpointing_policy.class_path == policy
    # FSDP's checkpointing and the model's own would recompute every layer twice
    assert not parsed.model.backbone.gradient_checkpointing
    assert "Qwen2DecoderLayer" not in yaml.safe_dump(yaml.safe_load(path.read_text()))


def test_a_device_this_machine_lacks_is_refused_in_one_line():
    from pdlightning.decoding.lm import check_device

    check_device("cpu")
    with pytest.raises(ValueError, match=r"device 'gpu' is not a torch device"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:0': this torch has no cuda device here"):
            check_device("cuda:0")
    else:
        with pytest.raises(ValueError, match=r"CUDA device\(s\) here"):
            check_device(f"cuda:{torch.cuda.device_count()}")
