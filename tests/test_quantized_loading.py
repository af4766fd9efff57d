"""model.quantization: loading a bitsandbytes base, the full-precision weights behind it, what never imports
bitsandbytes, and the refusals (issue 21 items 1 and 2). The method on that base: tests/test_quantized.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, tiny_llama, tiny_overrides, write_train_rows
from omegaconf import OmegaConf

from neuroada_cli.errors import UserError
from neuroada_cli.models import check_quantization, full_precision_weights, is_quantized, load_model_and_tokenizer

pytest.importorskip("bitsandbytes")


def test_unknown_value_and_missing_package_are_one_line_errors(monkeypatch):
    with pytest.raises(UserError, match="model.quantization='int4' is unknown; use null, nf4, fp4, int8"):
        check_quantization("int4")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match=r"needs the bitsandbytes package: pip install 'neuroada\[quantization\]'"):
        load_model_and_tokenizer("/nonexistent/model", quantization="nf4")  # before the (missing) folder is read


@pytest.mark.parametrize("quantization, layer_class", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_load_is_frozen_bitsandbytes_close_to_full_precision(tiny_llama_dir, quantization, layer_class):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), quantization=quantization)
    reference, _ = load_model_and_tokenizer(str(tiny_llama_dir))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer_class
    assert is_quantized(model) and not is_quantized(reference)
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert not any(p.requires_grad for p in model.model.layers[0].mlp.down_proj.parameters())
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized, full = model(input_ids=ids).logits, reference(input_ids=ids).logits
    # 4 bits: per-weight error ~ 1/16 of a block's range; logits of this 2-layer model stay within a few percent
    assert (quantized - full).abs().max() < 0.1 * full.abs().max()


def test_full_precision_weights_read_lazily_from_the_checkpoint(tiny_llama_dir):
    model = tiny_llama()
    names = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.1.mlp.down_proj": (32, 64)}
    weights = full_precision_weights(tiny_llama_dir, names, torch.bfloat16)
    assert sorted(weights) == sorted(names)
    for name in names:
        expected = model.get_submodule(name).weight.detach().to(torch.bfloat16)
        assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name], expected)
    # a renamed/fused tensor, a wrong shape, or a pre-quantized checkpoint: nothing to read (dequantized selection)
    assert full_precision_weights(tiny_llama_dir, {"model.layers.0.self_attn.qkv_proj": (96, 32)}, torch.float32) is None
    assert full_precision_weights(tiny_llama_dir, {"model.layers.0.mlp.down_proj": (64, 32)}, torch.float32) is None
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    assert full_precision_weights(tiny_llama_dir, names, torch.float32) is None


@pytest.mark.parametrize("method, selection, strategy, message", [
    ("neuroada", "magnitude", "fsdp", "not supported with trainer.strategy=fsdp yet .* use trainer.strategy=ddp"),
    ("full", "magnitude", "ddp", "method=full cannot train a model.quantization=nf4 base"),
    ("neuroada", "gradient", "ddp", "selection=gradient is not available on a model.quantization=nf4 base"),
])
def test_what_cannot_run_on_a_quantized_base_is_refused_before_loading(method, selection, strategy, message):
    from neuroada_cli.methods import load_base

    cfg = OmegaConf.create({"method": method, "model": {"name_or_path": "/nonexistent/model", "quantization": "nf4"},
                            "neuroada": {"selection": selection}, "trainer": {"strategy": strategy},
                            "task": {"kind": "causal_lm"}})
    with pytest.raises(UserError, match=message):
        load_base(cfg, None)  # the folder does not exist: the refusal comes first


IMPORT_PROBE = """
import sys
sys.path.insert(0, {tests!r})
from helpers import train_in_process
train_in_process({overrides!r})
print("BNB_IMPORTED", "bitsandbytes" in sys.modules, "peft" in sys.modules)
"""


def test_training_without_quantization_never_imports_bitsandbytes(tiny_llama_dir, tmp_path):
    """peft imports bitsandbytes whenever it is installed; an unquantized NeuroAda run must import neither."""
    data = write_train_rows(tmp_path / "data", n=16)
    overrides = tiny_overrides(tiny_llama_dir, data, tmp_path / "run", steps=1) + ["eval.after_train=false"]
    probe = IMPORT_PROBE.format(tests=str(REPO / "tests"), overrides=overrides)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "BNB_IMPORTED False False" in result.stdout, result.stdout[-500:]
    assert "gemm_4bit_forward" not in result.stderr


def test_quantized_import_is_silent():
    """On a CPU, bitsandbytes logs twice that it cannot fetch a kernel; import_bitsandbytes silences that."""
    probe = "from neuroada_cli.models import import_bitsandbytes; import_bitsandbytes(); print('ok')"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and result.stdout.strip() == "ok"
    assert "gemm_4bit_forward" not in result.stderr and "Failed to load" not in result.stderr, result.stderr

