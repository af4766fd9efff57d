"""Helpers shared by the test files (import them: ``from helpers import cli, tiny_llama``).

Everything here builds things in-process, offline: a byte-level BPE tokenizer trained on a tiny corpus, tiny
random Llama / BERT / RoBERTa checkpoints, LLM-Adapters and GLUE data files, and a way to run the CLI.
Fixtures live in conftest.py and are built from these functions.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO.parent / "shared" / "data"


# ------------------------------------------------------------------------------ tokenizer and tiny Llama
_CORPUS = [
    "Please choose the correct answer to the question: the correct answer is true false",
    "solution1 solution2 option1 option2 answer1 answer2 answer3 answer4 answer5 ending1 ending2",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: The answer is 12. 3 + 4 = 7 and 0.5 * 10 = 5, so -2 apples (A) (B)",
    "the quick brown fox jumps over the lazy dog; a man is playing a guitar. entailment not_entailment",
]


def make_tokenizer(pad_is_eos: bool = True, padding_side: str = "right"):
    """A byte-level BPE tokenizer trained on a tiny corpus; pad = eos like SmolLM2 when pad_is_eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>"] if pad_is_eos else ["<|endoftext|>", "<s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<s>",
        pad_token="<|endoftext|>" if pad_is_eos else "<pad>",
        padding_side=padding_side,
    )


def tiny_llama_config(vocab_size: int = 400, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


# ------------------------------------------------------------------------------ training data and the CLI
TRAIN_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "answer", "solution1", "option2"]


def write_train_rows(data_dir: Path, n: int = 48, seed: int = 0, stem: str = "commonsense_15k") -> Path:
    """LLM-Adapters style rows of varied length under <data_dir>/llm_adapters/<stem>/train.json."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = rng.choice(["true", "false"])
        words = " ".join(rng.choice(TRAIN_WORDS) for _ in range(rng.randint(2, 24)))
        rows.append({"instruction": f"Please choose the correct answer to the question: {words}", "input": "",
                     "output": f"the correct answer is {answer}", "answer": answer})
    folder = data_dir / "llm_adapters" / stem
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(rows))
    return data_dir


def tiny_overrides(model_dir: Path, data_dir: Path, output_dir: Path, steps: int = 4) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.dir={data_dir}", f"trainer.output_dir={output_dir}",
            f"trainer.max_steps={steps}", "trainer.batch_size=8", "trainer.micro_batch_size=2", "data.max_length=64",
            "neuroada.k=4", "optimizer.lr=1e-2", "trainer.checkpoint_every=0", "optimizer.warmup_ratio=0.25"]


def train_in_process(overrides: list[str]) -> Path:
    from neuroada_cli import config
    from neuroada_cli.training.recipe import train

    return train(config.validate(config.compose(None, overrides)))


def deltas(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(one: Path, two: Path) -> None:
    """Two runs' adapters (e.g. 2 processes vs 1): deltas within 1e-4 of their scale (gloo's all-reduce sums in
    another order than accumulation does), every other tensor (the selected columns) identical."""
    a, b = deltas(one), deltas(two)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("delta"):
            scale = a[name].abs().max()
            assert scale > 0 and (a[name] - b[name]).abs().max() <= 1e-4 * scale, name
        else:
            assert a[name].equal(b[name]), name


def kill_after_first_checkpoint(train_args: list[str], output_dir: Path, timeout: float) -> None:
    """Start ``neuroada train ARGS trainer.output_dir=OUTPUT_DIR`` and SIGKILL it once a checkpoint exists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "neuroada_cli", "train", *train_args,
                                f"trainer.output_dir={output_dir}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not list((output_dir / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def pair_rows(n: int = 8) -> list[dict]:
    """Preference pairs (prompt / chosen / rejected) in the authors' answer format."""
    words = ["the quick brown fox", "jumps over the lazy dog", "a man is playing a guitar", "the answer is 12"]
    return [{"prompt": f"Please choose the correct answer to the question: {words[i % 4]} {i}\n",
             "chosen": "the correct answer is true", "rejected": f"the correct answer is {['false', 'option2'][i % 2]}"}
            for i in range(n)]


def cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 300,
        **popen) -> subprocess.CompletedProcess:
    """Run ``python -m neuroada_cli ARGS`` offline; raise with its stderr when check and it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "neuroada_cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"neuroada {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


# ------------------------------------------------------------------------------ GLUE data and encoders
GLUE_WORDS = ("a man is playing guitar plays music the dog cat runs sleeps sits on mat woman reads book "
              "child eats apple car drives fast slow red blue green big small happy sad yes no not").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *GLUE_WORDS]


def sentence(rng: random.Random, length: int = 6) -> str:
    return " ".join(rng.choice(GLUE_WORDS) for _ in range(length)) + " ."


def glue_rows(task: str, n: int, seed: int = 0) -> list[dict]:
    """Rows with a learnable signal: label 1 (or a high score) when the first word is 'yes'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        first = ("yes " if positive else "no ") + sentence(rng, rng.randint(3, 8))
        if task == "stsb":
            rows.append({"sentence1": first, "sentence2": sentence(rng), "label": round(4.0 + rng.random(), 2)
                         if positive else round(rng.random(), 2), "idx": i})
        elif task in ("rte", "mrpc"):
            rows.append({"sentence1": first, "sentence2": sentence(rng), "label": 0 if positive else 1, "idx": i})
        else:  # cola / sst2
            rows.append({"sentence": first, "label": 1 if positive else 0, "idx": i})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_glue_task(data_dir: Path, task: str, train: int = 64, validation: int = 24) -> Path:
    write_jsonl(data_dir / "glue" / task / "train.jsonl", glue_rows(task, train, seed=1))
    write_jsonl(data_dir / "glue" / task / "validation.jsonl", glue_rows(task, validation, seed=2))
    return data_dir


def bert_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(folder))


def tiny_bert_dir(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random BertModel checkpoint (no head: the head is added at load time, like MiniLM)."""
    from transformers import BertConfig, BertModel

    tokenizer = bert_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_roberta_dir(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random RobertaModel checkpoint with a byte-level BPE tokenizer (make_tokenizer's, with <pad>)."""
    from transformers import RobertaConfig, RobertaModel

    tokenizer = make_tokenizer(pad_is_eos=False)
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, type_vocab_size=1)
    RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------ tiny models for the method tests
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg), ["query", "key", "value", r".*attention\.output\.dense",
                                                r".*intermediate\.dense", r".*layer\.\d+\.output\.dense"]


def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    cfg = RobertaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=70, num_labels=2)
    return RobertaForSequenceClassification(cfg), ["query", "key", "value", "dense"]


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    cfg = GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return GPTNeoXForCausalLM(cfg), ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


ARCHS = {"llama": _llama, "bert": _bert, "roberta": _roberta, "gpt_neox": _neox}  # name -> (model, targets)
CAUSAL_ARCHS = ("llama", "gpt_neox")
ARCH_HEADS = {"bert": ["classifier"], "roberta": ["classifier"]}  # trained fully (modules_to_save)


def build_arch(arch: str, seed: int = 0, dtype=torch.float32):
    """A tiny random model of ``arch`` (eval mode, random biases) and its NeuroAda target_modules."""
    from torch import nn

    torch.manual_seed(seed)
    model, targets = ARCHS[arch]()
    for module in model.modules():  # random biases, so bias handling is exercised
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.normal_(module.bias, std=0.1)
    return model.to(dtype).eval(), targets


def arch_batch(arch: str, seed: int = 1, length: int = 9) -> dict:
    """Two rows with labels (the second padded at the end): class labels for encoders, token labels else."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    if arch in CAUSAL_ARCHS:
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}


def randomise_deltas(model, seed: int = 2, scale: float = 0.05) -> None:
    from neuroada_cli import neuroada_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in neuroada_layers(model).values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator) * scale)


def adapted(arch: str, k: int = 3, impl: str = "fused", dtype=torch.float32, scale: float = 0.05, **config):
    """build_arch + inject (heads trained fully) + random non-zero deltas."""
    from neuroada_cli import NeuroAdaConfig, inject

    model, targets = build_arch(arch, dtype=dtype)
    config.setdefault("modules_to_save", ARCH_HEADS.get(arch, []))
    inject(model, NeuroAdaConfig(k=k, target_modules=targets, impl=impl, **config))
    randomise_deltas(model, scale=scale)
    return model


def naive_forward(model, arch: str, inputs: dict):
    """Reference by hand: a fresh copy of the base with W + scatter(delta) written into plain linears."""
    from neuroada_cli import neuroada_layers

    plain, _ = build_arch(arch, dtype=next(model.parameters()).dtype)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "neuroada" not in k}, strict=False)
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, layer in neuroada_layers(model).items():
            target = modules[name]
            dense = layer.neuroada_orig.float() + layer.delta.float()
            weight = layer.base_layer.weight.detach().float().clone()
            weight.scatter_(1, layer.neuroada_idx, dense)
            target.weight.copy_(weight.to(target.weight.dtype))
    return plain(**inputs)


# ------------------------------------------------------------------------------ the fault matrix (issue 15)
FAULT_STEPS = 4


def tree_hash(folder: Path) -> dict[str, str]:
    """Every file (and folder) under ``folder`` -> the hash of its bytes: "unchanged" means equal dicts."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def fails(capsys, args: list[str], code: int = 2) -> str:
    """Run ``neuroada ARGS``; assert exit ``code`` and one error line without a traceback; return that line."""
    from neuroada_cli.cli import main

    capsys.readouterr()
    assert main(args) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def overrides(setup: dict, output: Path, steps: int = FAULT_STEPS, checkpoint_every: int = 2) -> list[str]:
    kept = [o for o in tiny_overrides(setup["model"], setup["data"], output, steps)
            if not o.startswith("trainer.checkpoint_every")]
    return kept + [f"trainer.checkpoint_every={checkpoint_every}"]


def no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def fail_final_rename(monkeypatch, file_name: str, code: int) -> None:
    """The atomic writer's last step (os.replace into place) fails with ``code`` for files named ``file_name``:
    a full or read-only disk hit after the temporary file was written."""
    import neuroada_cli.atomic as atomic

    real_replace = atomic.os.replace

    def replace(source, target):
        if Path(target).name == file_name:
            raise OSError(code, os.strerror(code))
        return real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", replace)


# ------------------------------------------------------------------------------ several processes
def free_port() -> int:
    with socket.socket() as sock:  # other test runs on this machine may hold accelerate's default 29500
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(*args: str, cwd) -> subprocess.CompletedProcess:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        import pytest

        pytest.skip("the accelerate launcher is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "neuroada_cli", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result
