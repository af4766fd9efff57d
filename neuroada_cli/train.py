"""The training recipe: one validated config in, one run directory out. Reads top to bottom.

Features and the config keys that drive them:

* method: ``method`` = neuroada (``neuroada.k``, ``.selection``, ``.target_modules``, ``.train_bias``,
  ``.modules_to_save``, ``.impl``, ``.seed``, ``.gradient_batches``) | lora (PEFT: ``lora.r``, ``.alpha``,
  ``.dropout``, ``.target_modules``) | full (every parameter). Selection runs identically on every process.
* model: ``model.name_or_path`` (hub id | local dir | embedded:NAME), ``model.dtype``, ``model.family``,
  ``model.gguf_file``.
* data: ``task.train_dataset`` rows from ``data.dir`` (else $NEUROADA_DATA_DIR, else the packaged sample),
  ``data.train_limit`` rows, ``task.template`` prompts, ``data.max_length`` tokens, length-bucketed global
  batches (``data.bucket_batches``, shuffled with ``trainer.seed`` every epoch; data/batching.py).
  ``task.kind=sequence_classification`` (GLUE, data/glue_train.py): one loss term per example,
  ``task.head_dropout``, and ``trainer.select_best`` keeps the epoch scoring best on the validation
  selection part (LoReFT protocol) as adapter/.
* batching: ``trainer.batch_size`` is global; accumulation steps = batch_size / (``trainer.micro_batch_size``
  x processes). The loss is the sum of token losses over the WHOLE global batch divided by its number of
  target tokens, so 2 processes x b examples give the same update as 1 process accumulating 2 x b.
* optimisation: AdamW over trainable parameters only (``optimizer.lr``, ``.weight_decay`` on matrices,
  ``.betas``, ``.eps``, ``.max_grad_norm``), ``optimizer.scheduler`` with ``optimizer.warmup_ratio``,
  ``trainer.epochs`` or ``trainer.max_steps`` optimizer steps.
* precision: ``trainer.precision`` fp32 | bf16 | fp16 (GPU) autocast through accelerate (deltas stay fp32);
  ``trainer.gradient_checkpointing`` (non-reentrant); seeded by ``trainer.seed``.
* processes: ``accelerate launch --multi_gpu --num_processes N -m neuroada_cli train ...`` (gloo on CPU);
  DDP with broadcast_buffers=False; every process derives its micro-batches from the same plan.
* run directory ``trainer.output_dir`` (agreed by all processes; only process 0 writes): config.yaml,
  train_log.jsonl every ``trainer.log_every`` steps, adapter/, run.json, checkpoints/ every
  ``trainer.checkpoint_every`` steps (atomic, last one kept); ``trainer.resume`` continues bitwise;
  ``trainer.tensorboard`` scalars; a rich progress bar (loss, lr, tokens/s, ETA) on process 0.
* ``eval.after_train`` runs ``neuroada eval`` on the finished run.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import methods, run_dir
from .data.batching import BatchPlan, split_global_batch
from .data.tokenize import IGNORE_INDEX
from .errors import UserError

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def train(cfg: DictConfig) -> Path:
    """Train as ``cfg`` says; returns the run directory."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed

    wall_start = time.perf_counter()
    t = cfg.trainer

    # ---- processes: one Accelerator; on CPU `cpu=True` turns a --multi_gpu launch into gloo DDP.
    if t.precision == "fp16" and not torch.cuda.is_available():  # accelerate would silently run fp32
        raise UserError("trainer.precision=fp16 needs a GPU; on CPU use trainer.precision=bf16 or fp32")
    _release_accelerator_state()  # a run that failed earlier in this process (tests, sweeps) may have left one
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=PRECISION_TO_ACCELERATE[t.precision],
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
    except (ValueError, RuntimeError) as err:
        raise UserError(f"trainer.precision={t.precision} is not usable here: {str(err).splitlines()[0]}") from None
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if t.batch_size % (t.micro_batch_size * world):
        raise UserError(f"trainer.batch_size={t.batch_size} is not divisible by micro_batch_size x processes = "
                        f"{t.micro_batch_size} x {world}")
    accumulation = t.batch_size // (t.micro_batch_size * world)
    set_seed(t.seed)

    # ---- run directory: process 0's resolved path wins (timestamps may differ by a second across ranks).
    output_dir = Path(broadcast_object_list([str(t.output_dir)])[0] if world > 1 else str(t.output_dir)).resolve()
    cfg.trainer.output_dir = str(output_dir)
    resume_from = _resume_point(output_dir, t.resume)

    # ---- data: rows (validated before the slow model load), then tokens, then the batch plan.
    # Causal LM: LLM-Adapters rows, loss on target tokens. GLUE (sequence_classification): data/glue_train.py.
    from .data import glue_train
    from .data.tokenize import collate_causal

    classify = cfg.task.kind == "sequence_classification"
    rows = None if classify else _load_rows(cfg)
    if cfg.eval.after_train:
        from .eval.runner import check_eval_inputs

        check_eval_inputs(cfg)  # a missing test file should fail now, not after hours of training
    model, tokenizer = _load_model(cfg, resume_from)
    if classify:
        glue_train.set_head_dropout(model, cfg.task.head_dropout)
    examples = _examples(cfg, rows, tokenizer)
    plan = BatchPlan([len(e["input_ids"]) for e in examples], t.batch_size, t.seed, cfg.data.bucket_batches)
    if plan.steps_per_epoch == 0:
        raise UserError(f"only {len(examples)} training examples, fewer than trainer.batch_size={t.batch_size}; "
                        "lower the batch size or raise data.train_limit")
    total_steps = t.max_steps or t.epochs * plan.steps_per_epoch
    # Loss normaliser per example: its target tokens (causal LM) or 1 (classification: every example once).
    targets = [1] * len(examples) if classify else [sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in examples]
    pad_id = tokenizer.pad_token_id
    collate_examples = glue_train.collate if classify else collate_causal

    def collate(indices: list[int]) -> dict:
        batch = collate_examples([examples[i] for i in indices], pad_id)
        return {key: value.to(accelerator.device) for key, value in batch.items()}

    # trainer.select_best (GLUE, LoReFT protocol): score the selection part of validation after every
    # epoch and keep the best epoch's adapter.
    selection = _selection_examples(cfg, tokenizer) if t.select_best else None
    best = None

    # ---- method: NeuroAda / LoRA / full, identical on every process (deterministic selection).
    gradient_batches = [collate(chunk) for step in range(min(cfg.neuroada.gradient_batches, plan.steps_per_epoch))
                        for chunk in split_global_batch(plan.global_batch(step), 0, 1, t.micro_batch_size)] \
        if cfg.method == "neuroada" and cfg.neuroada.selection == "gradient" and resume_from is None else None
    model = methods.attach(cfg, model, gradient_batches, resume_from)
    if t.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    counts = methods.count_trainable(cfg, model)
    if is_main:  # the trainable split on screen as in run.json (NeuroAda: bypass / head / bias)
        parts = [f"{name} {counts[f'{name}_params']:,}" for name in ("bypass", "head", "bias")
                 if f"{name}_params" in counts]
        print(f"trainable {counts['trainable_params']:,} of {counts['total_params']:,} "
              f"({counts['trainable_percent']:.3f}%)" + (f" = {' + '.join(parts)}" if parts else ""), flush=True)
    slice_logits = _accepts_logit_mask(model)

    # ---- optimizer and schedule (weight decay on matrices only: not on biases and norms, as HF Trainer).
    from transformers import get_scheduler

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    o = cfg.optimizer
    groups = [{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    warmup = math.ceil(total_steps * o.warmup_ratio)
    scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(o.scheduler, o.scheduler), optimizer,
                              num_warmup_steps=warmup, num_training_steps=total_steps)
    # The scheduler stays unprepared: accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)

    # ---- the run directory is written only now that data, model and method are known to work.
    accelerator.wait_for_everyone()  # every process checked the directory before process 0 writes to it
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # ---- resume: optimizer, scheduler, RNG and position from the last checkpoint.
    start_step = 0
    if resume_from is not None:
        start_step, extra = run_dir.load_trainer_state(resume_from[1], optimizer, scheduler)
        best = extra.get("best")
    if is_main:  # drop what a killed session logged after its last checkpoint (everything if it had none)
        run_dir.truncate_log(output_dir / "train_log.jsonl", start_step)
    log_file = open(output_dir / "train_log.jsonl", "a") if is_main else None
    board = _tensorboard(output_dir) if is_main and t.tensorboard else None

    # ---- the loop: one iteration = one optimizer step over one global batch. Time outside
    # forward/backward/optimizer (data, logging, checkpoints) is recorded as the loop's overhead.
    progress, task_id = _progress(is_main, total_steps, start_step, cfg.recipe or "train")
    timing = dict.fromkeys(("loop", "compute", "data", "log", "checkpoint", "selection"), 0.0)
    tokens_seen, last_loss = 0, float("nan")
    for step in range(start_step, total_steps):
        step_start = time.perf_counter()
        global_batch = plan.global_batch(step)
        global_targets = sum(targets[i] for i in global_batch)  # known to every process: no all-reduce
        global_tokens = sum(plan.lengths[i] for i in global_batch)
        micro_batches = [collate(chunk) for chunk in split_global_batch(global_batch, rank, world, t.micro_batch_size)]

        compute_start = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        for number, batch in enumerate(micro_batches):
            last = number == accumulation - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                token_loss = glue_train.loss_sum(model, batch) if classify else _token_loss_sum(model, batch,
                                                                                                slice_logits)
                # DDP averages gradients over processes, hence x world: the result is sum / global targets.
                accelerator.backward(token_loss * world / global_targets)
            loss_sum += token_loss.detach()
        if o.max_grad_norm is not None:
            accelerator.clip_grad_norm_([p for _, p in trainable], o.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log_start = time.perf_counter()
        timing["data"] += compute_start - step_start
        timing["compute"] += log_start - compute_start

        done = step + 1
        tokens_seen += global_tokens
        if done % t.log_every == 0 or done == total_steps:
            last_loss = (accelerator.reduce(loss_sum, "sum") if world > 1 else loss_sum).item() / global_targets
            record = {"step": done, "epoch": round(done / plan.steps_per_epoch, 4), "loss": round(last_loss, 6),
                      "lr": scheduler.get_last_lr()[0], "tokens": global_tokens, "target_tokens": global_targets,
                      "tokens_per_s": round(global_tokens / max(log_start - step_start, 1e-9), 2),
                      "step_s": round(log_start - step_start, 4), "elapsed_s": round(timing["loop"], 2)}
            if is_main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if board is not None:
                    for key in ("loss", "lr", "tokens_per_s"):
                        board.add_scalar(f"train/{key}", record[key], done)
                average = tokens_seen / max(timing["loop"] + log_start - step_start, 1e-9)
                progress.update(task_id, completed=done,
                                stats=f"loss {last_loss:.4f}  lr {record['lr']:.2e}  {average:.0f} tok/s")
        selection_start = time.perf_counter()
        timing["log"] += selection_start - log_start
        if selection is not None and (done % plan.steps_per_epoch == 0 or done == total_steps):
            if is_main:  # evaluation time is not loop overhead: it is kept apart
                best = _select_best(cfg, accelerator.unwrap_model(model), tokenizer, selection, done, best,
                                    output_dir, log_file)
            accelerator.wait_for_everyone()
        checkpoint_start = time.perf_counter()
        timing["selection"] += checkpoint_start - selection_start
        if t.checkpoint_every and (done % t.checkpoint_every == 0 or done == total_steps):
            if is_main:
                state = run_dir.trainer_state(done, plan.position(done), optimizer, scheduler, {"best": best})
                run_dir.write_checkpoint(output_dir, done, lambda tmp: _write_checkpoint(cfg, model, accelerator,
                                                                                         tokenizer, state, tmp))
            accelerator.wait_for_everyone()
        timing["checkpoint"] += time.perf_counter() - checkpoint_start
        timing["loop"] += time.perf_counter() - step_start - (checkpoint_start - selection_start)
    progress.stop()

    # ---- results: adapter, run record; then optionally evaluate.
    accelerator.wait_for_everyone()
    if is_main:
        log_file.close()
        if board is not None:
            board.close()
        if selection is None:  # with select_best, adapter/ already holds the best epoch's adapter
            methods.save_trained(cfg, accelerator.unwrap_model(model), tokenizer, output_dir / "adapter")
        overhead = timing["loop"] - timing["compute"]
        record = {
            "recipe": cfg.recipe, "method": cfg.method, "model": cfg.model.name_or_path,
            **counts, "world_size": world, "accumulation_steps": accumulation,
            "steps": total_steps, "steps_this_session": total_steps - start_step,
            "resumed_from_step": start_step or None, "steps_per_epoch": plan.steps_per_epoch,
            "examples": len(examples), "final_loss": last_loss, "tokens_seen": tokens_seen,
            "tokens_per_second": tokens_seen / max(timing["loop"], 1e-9),
            "wall_seconds": time.perf_counter() - wall_start,
            **{f"{key}_seconds": value for key, value in timing.items()},
            "overhead_seconds": overhead, "overhead_percent": 100.0 * overhead / max(timing["loop"], 1e-9),
            **run_dir.peak_memory(), "adapter_bytes": run_dir.directory_bytes(output_dir / "adapter"),
            "git_commit": run_dir.git_commit(), "selection": best,
        }
        run_dir.write_json(output_dir / "run.json", record)
    accelerator.wait_for_everyone()
    if is_main and cfg.eval.after_train:  # the in-memory model: no reload; other processes are done
        from .cli import eval_config_for_run
        from .eval.runner import run_eval_from_config

        trained = accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
        eval_cfg = eval_config_for_run(output_dir, [])
        if selection is None:  # the in-memory model is the final one; with select_best the runner loads the best
            eval_cfg.eval.adapter = None  # already on the model; applying it again would stack LoRA
            run_eval_from_config(eval_cfg, model=trained, tokenizer=tokenizer)
        else:
            run_eval_from_config(eval_cfg)
    accelerator.end_training()
    _release_accelerator_state()
    return output_dir


# ------------------------------------------------------------------------------------------ steps
def _resume_point(output_dir: Path, resume: bool) -> tuple[int, Path] | None:
    if not resume:
        if run_dir.holds_run(output_dir):
            raise UserError(f"output dir {str(output_dir)!r} already holds a run; pass trainer.resume=true to continue "
                            "it or choose another trainer.output_dir")
        return None
    return run_dir.latest_checkpoint(output_dir)


def _load_rows(cfg: DictConfig) -> list[dict]:
    from .data.train_sets import load_train_rows

    return load_train_rows(cfg.task.train_dataset, cfg.data.dir, limit=cfg.data.train_limit, seed=cfg.trainer.seed)


def _examples(cfg: DictConfig, rows: list[dict] | None, tokenizer) -> list[dict]:
    if cfg.task.kind == "sequence_classification":
        from . import paths
        from .data import glue_train

        return glue_train.train_examples(cfg.task.train_dataset, paths.data_dir(cfg.data.dir), tokenizer,
                                         cfg.data.max_length, cfg.data.train_limit, cfg.trainer.seed)
    from .data.tokenize import tokenize_rows

    return tokenize_rows(rows, tokenizer, cfg.task.template, cfg.data.max_length)


def _selection_examples(cfg: DictConfig, tokenizer) -> list[dict]:
    from . import paths
    from .data import glue_train

    return glue_train.selection_examples(cfg.task.train_dataset, paths.data_dir(cfg.data.dir), tokenizer,
                                         cfg.data.max_length, cfg.trainer.seed)


def _select_best(cfg, model, tokenizer, selection, step: int, best: dict | None, output_dir: Path, log_file):
    """Score the selection examples; a better primary metric than so far saves the adapter as adapter/."""
    from .data import glue_train
    from .data.glue import glue_task

    metric = glue_task(cfg.task.train_dataset).primary_metric
    metrics = glue_train.evaluate_examples(model, selection, cfg.task.train_dataset, tokenizer.pad_token_id,
                                           cfg.eval.batch_size)
    log_file.write(json.dumps({"step": step, "selection": metrics}) + "\n")
    log_file.flush()
    if best is None or metrics[metric] > best["value"]:
        methods.save_trained(cfg, model, tokenizer, output_dir / "adapter")
        best = {"metric": metric, "value": metrics[metric], "step": step, "metrics": metrics}
    return best


def _load_model(cfg: DictConfig, resume_from):
    from .models import load_model_and_tokenizer

    source, gguf_file = cfg.model.name_or_path, cfg.model.gguf_file
    if cfg.method == "full" and resume_from is not None:
        source, gguf_file = str(resume_from[1] / "adapter"), None  # a full fine-tune checkpoints the whole model
    return load_model_and_tokenizer(source, kind=cfg.task.kind, dtype=cfg.model.dtype, gguf_file=gguf_file,
                                    family=cfg.model.family, num_labels=cfg.task.num_labels,
                                    problem_type=cfg.task.problem_type)


def _accepts_logit_mask(model) -> bool:
    """transformers causal LMs take ``logits_to_keep`` (a boolean [batch, seq] mask keeps those positions)."""
    from .models import forward_accepts

    return forward_accepts(model.get_base_model() if hasattr(model, "get_base_model") else model, "logits_to_keep")


def _token_loss_sum(model, batch: dict, slice_logits: bool) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropies over the supervised positions, in fp32.

    Only positions that predict a target token go through the LM head (``logits_to_keep`` mask): the
    prompt's logits are never formed, which saves the head's share of compute and the vocab-sized memory.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    if slice_logits:
        mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
        mask[:, :-1] = keep
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=mask).logits
        if logits.dim() == 2:  # [number of kept positions, vocab]
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        logits = logits[:, :-1]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")


def _write_checkpoint(cfg, model, accelerator, tokenizer, state: dict, directory: Path) -> None:
    methods.save_trained(cfg, accelerator.unwrap_model(model), tokenizer, directory / "adapter")
    torch.save(state, directory / "trainer_state.pt")


def _tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("trainer.tensorboard=true needs the tensorboard package: pip install 'neuroada[tensorboard]'") \
            from None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


def _progress(enabled: bool, total: int, start: int, name: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), disable=not enabled)
    task_id = progress.add_task(name, total=total, completed=start, stats="")
    progress.start()
    return progress, task_id


def _release_accelerator_state() -> None:
    """Let a sweep create the next job's Accelerator (maybe with another precision) in this process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
