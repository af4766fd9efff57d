"""trainer.cross_entropy: the chunked loss equals the plain one (loss, every gradient) whatever wraps the model.

Tiny Llama in fp32, target positions in the middle and at the end of rows (prompt masked, padding), chunks
forced small (kinds/losses.CHUNK_BYTES) so a batch spans several chunks. Relative tolerance 1e-6 (the
issue's bound): only the summation order differs.
"""
from __future__ import annotations

import pytest
import torch

from neuroada_cli.data import IGNORE_INDEX
from neuroada_cli.errors import UserError
from neuroada_cli.kinds import losses
from neuroada_cli.kinds.causal_lm import CausalLM

from helpers import tiny_llama

RTOL = 1e-6


def make_kind(cross_entropy: str, packing: bool = False) -> CausalLM:
    return CausalLM(train_dataset="unused", data_dir=None, template="alpaca", max_length=32, train_limit=None,
                    seed=0, cross_entropy=cross_entropy, packing=packing)


def batch(seed: int = 3, vocab: int = 400) -> dict:
    """Three rows: different prompt lengths, one padded row (its labels -100 past the end)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length, prompt in ((17, 5), (12, 3), (9, 8)):
        ids = torch.randint(2, vocab, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return make_kind("plain").collate(examples, pad_id=0)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    """Relative to the tensor's scale (a gradient entry near 0 has no meaningful relative error of its own)."""
    return (a - b).abs().max().item() <= rtol * max(b.abs().max().item(), 1e-12)


def run(model, kind: CausalLM, inputs: dict):
    """Loss, gradients of every trainable parameter and of the final hidden states (after the last norm)."""
    model.zero_grad(set_to_none=True)
    captured = {}

    def keep_hidden(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    norm = losses.unwrap(model).get_decoder().norm if hasattr(losses.unwrap(model), "get_decoder") else None
    handle = norm.register_forward_hook(keep_hidden)
    try:
        loss = kind.loss_sum(model, inputs)
        loss.backward()
    finally:
        handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, captured["hidden"].grad.clone()


def assert_same(model, impl: str, inputs: dict, monkeypatch, chunk_positions: int = 4):
    monkeypatch.setattr(losses, "CHUNK_BYTES", chunk_positions * 4 * 400)  # 4 positions per chunk (vocab 400)
    plain_loss, plain_grads, plain_hidden = run(model, make_kind("plain"), inputs)
    loss, grads, hidden = run(model, make_kind(impl), inputs)
    assert torch.isfinite(plain_loss) and plain_loss > 0
    assert abs(loss.item() - plain_loss.item()) <= RTOL * plain_loss.item()
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        assert close(grads[name], plain_grads[name]), name
    assert close(hidden, plain_hidden)
    return grads


def test_chunk_rows_follow_the_vocabulary():
    head = torch.nn.Linear(8, 128_256, bias=False)
    assert losses.chunk_rows(head) * 4 * 128_256 <= losses.CHUNK_BYTES
    assert losses.chunk_rows(torch.nn.Linear(8, 49_152)) > losses.chunk_rows(head)


def test_chunked_equals_plain_full_finetuning(monkeypatch):
    model = tiny_llama().train()  # every parameter trains, the head included
    inputs = batch()
    assert (inputs["labels"][:, 1:] != IGNORE_INDEX).sum() > 3 * 4  # several chunks
    grads = assert_same(model, "chunked", inputs, monkeypatch)
    assert grads["lm_head.weight"].abs().sum() > 0


def test_chunked_equals_plain_tied_head(monkeypatch):
    model = tiny_llama(tie_word_embeddings=True).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same(model, "chunked", batch(), monkeypatch)


def test_chunked_equals_plain_neuroada(monkeypatch):
    from neuroada_cli.core.config import NeuroAdaConfig
    from neuroada_cli.core.model import inject

    model = inject(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    model.train()
    grads = assert_same(model, "chunked", batch(), monkeypatch)
    assert any("lm_head" in name for name in grads)  # an adapted head: its delta gets gradients too


def test_chunked_equals_plain_lora_with_trained_head(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"], init_lora_weights=False))
    model.train()
    grads = assert_same(model, "chunked", batch(), monkeypatch)
    head = [name for name in grads if "lm_head" in name]
    assert head and all(grads[name].abs().sum() > 0 for name in head)


def test_chunked_in_bf16_autocast(monkeypatch):
    """bf16 (autocast, as trainer.precision=bf16): the chunks recompute under the same autocast state."""
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 4 * 400)
    model = tiny_llama().train()
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_grads, _ = run(model, make_kind("plain"), inputs)
        loss, grads, _ = run(model, make_kind("chunked"), inputs)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - plain_loss.item()) <= 1e-2 * plain_loss.item()
    for name in grads:
        assert close(grads[name], plain_grads[name], 5e-2), name


def test_model_without_logits_to_keep(monkeypatch):
    """A forward without logits_to_keep hands the head every position; the loss picks the targets itself."""
    model = tiny_llama().train()
    plain, chunked = make_kind("plain"), make_kind("chunked")
    for kind in (plain, chunked):
        kind.prepare_model(model)
        kind._slice_logits = False
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 4 * 400)
    inputs = batch()
    expected, expected_grads, _ = run(model, plain, inputs)
    loss, grads, _ = run(model, chunked, inputs)
    assert abs(loss.item() - expected.item()) <= RTOL * expected.item()
    assert all(close(grads[name], expected_grads[name]) for name in grads)


def test_evaluation_uses_the_same_loss(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 4 * 400)
    model = tiny_llama()
    examples = [{"input_ids": list(range(2, 2 + n)), "labels": [IGNORE_INDEX] * 2 + list(range(4, 2 + n))}
                for n in (6, 9, 14)]
    plain = make_kind("plain").evaluate(model, examples, 0, batch_size=2)["loss"]
    chunked = make_kind("chunked").evaluate(model, examples, 0, batch_size=2)["loss"]
    assert chunked == pytest.approx(plain, rel=RTOL)


def test_auto_picks_chunked_on_cpu_and_plain_for_softcapped_logits():
    model = tiny_llama()
    assert losses.resolve_impl("auto", model, torch.device("cpu")) == "chunked"
    assert losses.resolve_impl("plain", model, torch.device("cpu")) == "plain"
    model.config.final_logit_softcapping = 30.0  # as Gemma 2: the logits change after the head
    assert losses.resolve_impl("auto", model, torch.device("cpu")) == "plain"
    with pytest.raises(UserError, match="final_logit_softcapping"):
        losses.resolve_impl("chunked", model, torch.device("cpu"))


def test_liger_without_package_or_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(losses, "liger_installed", lambda: False)
    with pytest.raises(UserError, match="liger-kernel") as error:
        make_kind("liger").check_inputs()
    assert "\n" not in str(error.value)
    monkeypatch.setattr(losses, "liger_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA") as error:
        losses.check_liger_available()
    assert "\n" not in str(error.value)


def test_liger_needs_a_plain_linear_head():
    assert losses.liger_weight(torch.nn.Linear(4, 8, bias=False)) is not None
    assert losses.liger_weight(torch.nn.Linear(4, 8, bias=True)) is None
    assert losses.liger_weight(torch.nn.Identity()) is None


def test_unknown_cross_entropy_is_refused():
    with pytest.raises(UserError, match="trainer.cross_entropy"):
        make_kind("fused")


def test_head_forward_is_restored():
    model = tiny_llama().train()
    make_kind("chunked").loss_sum(model, batch())
    assert "forward" not in model.lm_head.__dict__
    assert model(input_ids=torch.tensor([[2, 3]])).logits.shape == (1, 2, 400)


@pytest.mark.cuda
def test_liger_equals_plain_on_cuda():
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_llama().cuda().train()
    inputs = {key: value.cuda() for key, value in batch().items()}
    plain_loss, plain_grads, _ = run(model, make_kind("plain"), inputs)
    loss, grads, _ = run(model, make_kind("liger"), inputs)
    assert abs(loss.item() - plain_loss.item()) <= 1e-4 * plain_loss.item()
    assert all(close(grads[name], plain_grads[name], 1e-3) for name in grads)
