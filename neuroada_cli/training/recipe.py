"""The training recipe: one validated config in, one run directory out. Reads top to bottom.

``train(cfg)`` = ``TrainingRecipe(cfg)``: ``setup()`` (processes, data, model, method, optimizer, resume),
``train()`` (each optimizer step: ``step()`` then ``end_of_step()`` = log / validate / checkpoint),
``finish()`` (adapter, run.json, eval). The task kind (``kinds/``) owns examples, collation and loss; the
method (``methods/``) owns attaching, counting and saving: nothing here asks which kind or method it runs.

Features and the config keys that drive them:

* method: ``method`` = neuroada (``neuroada.k``, ``.selection``, ``.target_modules``, ``.train_bias``,
  ``.modules_to_save``, ``.impl``, ``.seed``, ``.gradient_batches``) | lora (PEFT: ``lora.r``, ``.alpha``,
  ``.dropout``, ``.target_modules``) | full (every parameter). Selection runs identically on every process.
* model: ``model.name_or_path`` (hub id | local dir | embedded:NAME), ``model.dtype``, ``model.family``,
  ``model.gguf_file``, ``model.attn_implementation``; ``neuroada.target_modules=all-linear``.
* data (``task.kind``): causal_lm = ``task.train_dataset`` rows from ``data.dir`` (else $NEUROADA_DATA_DIR, else
  the packaged sample) or ``data.train_file`` (``data.format``: alpaca | prompt_completion | chat | llm_adapters),
  ``data.train_limit`` rows, ``task.template`` prompts, ``data.max_length`` tokens, loss on target tokens
  (``data.train_on_prompt``); sequence_classification (GLUE) = one loss term per example, ``task.head_dropout``.
  Length-bucketed global batches (``data.bucket_batches``, shuffled with ``trainer.seed`` every epoch;
  data/batching.py); ``data.packing`` packs each process's share into rows of ``data.max_length`` tokens.
* validation (``trainer.validate``, on by default) whenever the kind has validation examples (causal LM:
  ``data.val_file`` / ``data.val_fraction``; GLUE: the LoReFT selection part of the validation split): evaluated
  every ``trainer.eval_every`` optimizer steps (null/0 = epoch ends only) and at each epoch end, on process 0;
  adapter/ = the best evaluation by the kind's primary metric, adapter_last/ = the final weights;
  ``trainer.early_stopping_patience`` evaluations without improvement stop the run (validation.py).
* batching: ``trainer.batch_size`` is global; accumulation steps = batch_size / (``trainer.micro_batch_size``
  x processes). The loss is the sum of per-token (or per-example) losses over the WHOLE global batch divided by
  the batch's total weight, so 2 processes x b examples give the same update as 1 process accumulating 2 x b.
* optimisation: AdamW over trainable parameters only (``optimizer.lr``, ``.weight_decay`` on matrices,
  ``.betas``, ``.eps``, ``.max_grad_norm``), ``optimizer.scheduler`` with ``optimizer.warmup_ratio``,
  ``trainer.epochs`` or ``trainer.max_steps`` optimizer steps.
* precision: ``trainer.precision`` fp32 | bf16 | fp16 (GPU) autocast through accelerate (deltas stay fp32);
  ``trainer.gradient_checkpointing`` (non-reentrant); seeded by ``trainer.seed``.
* processes: ``accelerate launch --multi_gpu --num_processes N -m neuroada_cli train ...`` (gloo on CPU);
  ``trainer.strategy`` = ddp (broadcast_buffers=False) | fsdp (FSDP2 shards by rows, lean loading, gathered
  saves): an object from ``strategies/`` that loads, shards, wraps, synchronises and gathers; what it cannot
  run is refused before any model work. Every process derives its micro-batches from the same plan.
* refusals before training, on every process: a strategy that cannot run the config, a configuration that
  trains nothing (0 trainable parameters).
* run directory ``trainer.output_dir`` (agreed by all processes; only process 0 writes): config.yaml,
  train_log.jsonl every ``trainer.log_every`` steps, adapter/, run.json (counts, timing with the loop's
  overhead, memory, validation, code version), checkpoints/ every ``trainer.checkpoint_every`` steps (atomic,
  last one kept, with the best-so-far validation state); ``trainer.resume`` (true | auto) continues bitwise,
  after checking the config against the run's (resume.py) and before anything is written.
* faults: ``trainer.nonfinite`` (stop | skip, ``trainer.nonfinite_patience``) checks the loss and gradient norm
  before every optimizer step (guard.py); a failed write names its path and leaves nothing (atomic.py).
* trackers: ``trainer.report_to`` = [tensorboard, wandb, mlflow] through accelerate, offline by default, under
  <run>/trackers; progress on process 0: a rich bar on a terminal, else one plain line per ``log_every`` steps.
* ``eval.after_train`` runs ``neuroada eval`` on the finished run (the best adapter when validating; its inputs
  are checked before training).
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import run_dir
from ..atomic import check_writable_dir, write_atomic, write_json
from ..config import accumulation_steps, eval_config_for_run
from ..data.batching import BatchPlan, split_global_batch
from ..errors import UserError
from ..kinds import get_kind
from ..methods import counts_line, get_method, load_base
from ..strategies import get_strategy
from .guard import NonFiniteGuard, gradient_norm
from .resume import resume_changes, resume_point
from .run_lock import lock_run_directory
from .stopwatch import Stopwatch
from .parts import (ProgressBar, check_shared_directory, log_stream, make_accelerator, make_optimizer,
                    release_accelerator_state, start_trackers)
from .validation import ValidationState, evaluate_validation

# Loop time = these sections; "validation" (evaluating the validation examples) is timed apart.
LOOP_SECTIONS = ("data", "compute", "log", "checkpoint")


def train(cfg: DictConfig) -> Path:
    """Train as ``cfg`` says; returns the run directory."""
    recipe = TrainingRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:  # also on errors and Ctrl-C; removes the output folder it created if nothing was written
        if recipe.lock is not None:
            recipe.lock.release()


class TrainingRecipe:
    """One run: ``setup()``, ``train()`` (``step`` + ``end_of_step`` per optimizer step), ``finish()``."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.watch = Stopwatch(*LOOP_SECTIONS, "validation")
        self.wall_start = time.perf_counter()
        self.kind = get_kind(cfg.task.kind).from_config(cfg)
        self.method = get_method(cfg.method)
        self.strategy = get_strategy(cfg.trainer.strategy)
        self.lock = None  # the run directory's lock (process 0), taken in setup

    # ------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        from accelerate.utils import broadcast_object_list, set_seed

        cfg, t = self.cfg, self.cfg.trainer
        # One Accelerator (CPU: a --multi_gpu launch becomes gloo); trackers log under process 0's output dir.
        self.accelerator = make_accelerator(t.precision, list(t.report_to), Path(str(t.output_dir)).resolve())
        self.world, self.is_main = self.accelerator.num_processes, self.accelerator.is_main_process
        self.strategy.check(cfg, self.world)  # before any model work, on every process
        self.accumulation = accumulation_steps(t.batch_size, t.micro_batch_size, self.world)
        set_seed(t.seed)
        # Run directory: process 0's resolved path wins (timestamps may differ by a second across ranks).
        output = broadcast_object_list([str(t.output_dir)])[0] if self.world > 1 else str(t.output_dir)
        self.output_dir = Path(output).resolve()
        cfg.trainer.output_dir = str(self.output_dir)
        # Resume: the checkpoint and the saved config are read and checked now, before anything is written.
        check_writable_dir(self.output_dir, "trainer.output_dir")
        share = (lambda value: broadcast_object_list([value])[0]) if self.world > 1 else None
        self.lock = lock_run_directory(self.output_dir, self.is_main, share)  # a second run here refuses
        self.resume_from = resume_point(self.output_dir, t.resume)
        if self.world > 1:  # several machines: every process must see process 0's checkpoint
            check_shared_directory(None if self.resume_from is None else str(self.resume_from[1]), self.world)
        self.resume_changes, self.resume_state = [], None
        if self.resume_from is not None:
            self.resume_changes = resume_changes(self.output_dir, cfg)
            self.resume_state = run_dir.read_trainer_state(self.resume_from[1])
        reduce = (lambda flags: self.accelerator.reduce(flags, "sum")) if self.world > 1 else None
        self.guard = NonFiniteGuard(t.nonfinite, t.nonfinite_patience, reduce)

        # Fast checks first: a missing data or test file fails now, not after the model load or training.
        self.kind.check_inputs()
        if cfg.eval.after_train:
            from ..eval.runner import check_eval_inputs

            check_eval_inputs(cfg)
        model, self.tokenizer = self._load_model()
        self.kind.prepare_model(model)
        self.examples = self.kind.train_examples(self.tokenizer)
        self.weights = [self.kind.weight(example) for example in self.examples]
        self.plan = BatchPlan([len(e["input_ids"]) for e in self.examples], t.batch_size, t.seed,
                              cfg.data.bucket_batches, pack_length=cfg.data.max_length if cfg.data.packing else None)
        if self.plan.steps_per_epoch == 0:
            raise UserError(f"only {len(self.examples)} training examples, fewer than trainer.batch_size="
                            f"{t.batch_size}; lower the batch size or raise data.train_limit")
        self.total_steps = t.max_steps or t.epochs * self.plan.steps_per_epoch
        # Validation: the kind's held-out examples (None: it has none), evaluated as trainer.eval_every says.
        self.val_examples = self.kind.validation_examples(self.tokenizer) if t.validate else None
        self.validation = None
        if self.val_examples:
            self.validation = ValidationState(*self.kind.primary_metric, t.eval_every, t.early_stopping_patience)
        elif t.early_stopping_patience is not None:
            raise UserError("trainer.early_stopping_patience needs validation (trainer.validate=true and, for a "
                            "causal LM, data.val_file or data.val_fraction); or set trainer.early_stopping_patience=null")

        model = self.strategy.shard(self._attach(model), self._attached_structure, self.accelerator)
        self._count(model)
        optimizer, self.scheduler = make_optimizer(model, cfg.optimizer, self.total_steps)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # The scheduler stays unprepared: accelerate would step it once per process.
        self.model, self.optimizer, self.optimizer_state = self.strategy.prepare(self.accelerator, model, optimizer)
        self._open_run_directory()

    def _load_model(self):
        """The base (the strategy says which processes read weights; the others build it on the meta device)."""
        saved = self.resume_from[1] / "adapter" if self.resume_from is not None else None  # full: its saved model
        return self.strategy.load(self.accelerator, functools.partial(load_base, self.cfg, saved, kind=self.kind))

    def _attach(self, model):
        """The method on the model, identical on every process (deterministic selection), ready to train.

        On the meta device (a sharding strategy's processes other than 0) only the module tree matters: the
        values come from process 0 when the strategy shards, so no selection scores and no resume are computed.
        """
        cfg, t = self.cfg, self.cfg.trainer
        structure_only = next(model.parameters()).is_meta
        gradient_batches = None
        count = self.method.gradient_batch_count(cfg)
        if count and self.resume_from is None and not structure_only:
            steps = range(min(count, self.plan.steps_per_epoch))
            gradient_batches = [self._collate(chunk) for step in steps
                                for chunk in split_global_batch(self.plan.global_batch(step), 0, 1, t.micro_batch_size)]
        resume_dir = self.resume_from[1] if self.resume_from is not None and not structure_only else None
        model = self.method.attach(cfg, model, gradient_batches=gradient_batches, resume_dir=resume_dir)
        if t.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        return model

    def _attached_structure(self):
        """The attached model on the meta device (no weights read): what a sharding strategy fills."""
        structure, _ = load_base(self.cfg, None if self.resume_from is None else self.resume_from[1] / "adapter",
                                 kind=self.kind, empty=True)
        self.kind.prepare_model(structure)
        return self._attach(structure)

    def _count(self, model) -> None:
        """run.json's counts (of the whole model, also when sharded), on every process; nothing to train stops."""
        self.counts = self.method.count(model)
        if self.counts["trainable_params"] == 0:
            section = self.cfg.get(self.cfg.method) or {}  # the method's own keys that decide what trains
            keys = [f"{self.cfg.method}.{key}" for key in ("neuron_fraction", "k", "target_modules", "modules_to_save")
                    if key in section]
            raise UserError(f"method {self.method.describe(self.cfg)} trains nothing on {self.cfg.model.name_or_path} "
                            f"(0 trainable parameters); widen it: check {', '.join(keys) or 'the method keys'}")
        if self.is_main:  # the trainable split on screen as in run.json (NeuroAda: bypass / head / bias)
            print(counts_line(self.counts), flush=True)

    def _open_run_directory(self) -> None:
        """Written only now that data, model and method work; resume restores optimizer, schedule, RNG, step."""
        self.accelerator.wait_for_everyone()  # every process checked the directory before process 0 writes
        self.start_step = 0
        if self.resume_from is not None:  # restored (and so verified) before config.yaml is rewritten
            self.start_step, extra = run_dir.restore_trainer_state(self.resume_state, self.resume_from[1],
                                                                   self.optimizer_state, self.scheduler)
            if self.validation is not None:
                self.validation.restore(extra.get("validation"))
            if self.is_main and self.resume_changes:
                print(f"resuming with changes: {'; '.join(self.resume_changes)}", flush=True)
        if self.is_main:
            write_atomic(self.output_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self.log = None
        if self.is_main:
            self.log = log_stream(self.output_dir, self.start_step, self.accelerator.log)
            start_trackers(self.accelerator, self.output_dir, self.cfg.recipe or "neuroada",
                           OmegaConf.to_container(self.cfg, resolve=True))

    def _collate(self, indices: list[int]) -> dict:
        batch = self.kind.collate([self.examples[i] for i in indices], self.tokenizer.pad_token_id)
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    # --------------------------------------------------------------------------------------- loop
    def train(self) -> None:
        self.progress = ProgressBar(self.is_main, self.total_steps, self.start_step, self.cfg.recipe or "train")
        self.tokens_seen, self.last_loss = 0, float("nan")
        self.steps_done = self.start_step
        for step in range(self.start_step, self.total_steps):
            if self.validation is not None and self.validation.stopped_early:
                break  # early stopping (also when resuming a run that had stopped)
            loss_sum, batch_weight, batch_tokens = self.step(step)
            self.end_of_step(step + 1, loss_sum, batch_weight, batch_tokens)
            self.steps_done = step + 1
        self.progress.stop()

    def step(self, step: int) -> tuple[torch.Tensor, int, int]:
        """One optimizer step over global batch ``step``: (this process's summed loss, batch weight, tokens)."""
        accelerator, model = self.accelerator, self.model
        with self.watch.section("data"):
            global_batch = self.plan.global_batch(step)
            batch_weight = sum(self.weights[i] for i in global_batch)  # known to every process: no all-reduce
            batch_tokens = sum(self.plan.lengths[i] for i in global_batch)
            chunks = self.plan.micro_batches(step, accelerator.process_index, self.world,
                                             self.cfg.trainer.micro_batch_size)  # packed: fewer, same on every process
            micro_batches = [self._collate(chunk) for chunk in chunks]
        with self.watch.section("compute"):
            loss_sum = torch.zeros((), device=accelerator.device)
            for number, batch in enumerate(micro_batches):
                last = number == len(micro_batches) - 1
                with self.strategy.accumulating(accelerator, model, last):
                    loss = self.kind.loss_sum(model, batch)
                    # DDP averages gradients over processes, hence x world: the result is sum / batch weight.
                    accelerator.backward(loss * self.world / batch_weight)
                loss_sum += loss.detach()
            # fp16: overflowing gradients are the grad scaler's business (it skips the step and lowers its
            # scale), so only the loss is checked, and a skipped step still goes through the scaler.
            fp16 = self.cfg.trainer.precision == "fp16"
            grad_norm = None
            if self.cfg.optimizer.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(self.trainable, self.cfg.optimizer.max_grad_norm)
            elif not fp16:
                grad_norm = gradient_norm(self.trainable)
            if self.guard.allows_step(step + 1, loss_sum, None if fp16 else grad_norm) or fp16:
                self.optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
                    self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, batch_weight, batch_tokens

    def end_of_step(self, done: int, loss_sum: torch.Tensor, batch_weight: int, batch_tokens: int) -> None:
        t = self.cfg.trainer
        self.tokens_seen += batch_tokens
        with self.watch.section("log"):
            if done % t.log_every == 0 or done == self.total_steps:
                self._log_step(done, loss_sum, batch_weight, batch_tokens)
        end_of_epoch = done % self.plan.steps_per_epoch == 0 or done == self.total_steps
        with self.watch.section("validation"):
            if self.validation is not None and self.validation.due(done, end_of_epoch):
                self._validate(done)
        stopping = self.validation is not None and self.validation.stopped_early
        with self.watch.section("checkpoint"):
            if t.checkpoint_every and (done % t.checkpoint_every == 0 or done == self.total_steps or stopping):
                if self.is_main or self.strategy.collective:  # sharded: gathering the state is collective
                    self._checkpoint(done)
                self.accelerator.wait_for_everyone()

    def _log_step(self, done: int, loss_sum: torch.Tensor, batch_weight: int, batch_tokens: int) -> None:
        total = self.accelerator.reduce(loss_sum, "sum") if self.world > 1 else loss_sum
        self.last_loss = total.item() / batch_weight
        if not self.is_main:
            return
        step_seconds = self.watch.latest["data"] + self.watch.latest["compute"]
        loop_seconds = self.watch.total(*LOOP_SECTIONS)  # includes this step's data and compute
        line = {"step": done, "epoch": round(done / self.plan.steps_per_epoch, 4), "loss": round(self.last_loss, 6),
                "lr": self.scheduler.get_last_lr()[0], "tokens": batch_tokens, "target_tokens": batch_weight,
                "tokens_per_s": round(batch_tokens / max(step_seconds, 1e-9), 2), "step_s": round(step_seconds, 4),
                "elapsed_s": round(loop_seconds - step_seconds, 2)}
        self.log.write(done, line, {f"train/{key}": line[key] for key in ("loss", "lr", "tokens_per_s")})
        average = self.tokens_seen / max(loop_seconds, 1e-9)
        self.progress.show(done, self.last_loss, line["lr"], average)

    def _validate(self, done: int) -> None:
        """Every process evaluates its share of the validation examples (sharded models: all of them, as their
        forwards are collective) and gets the same metrics; a better primary metric saves adapter/ (process 0)."""
        from accelerate.utils import broadcast_object_list

        model = self.accelerator.unwrap_model(self.model)
        metrics = evaluate_validation(self.kind, model, self.val_examples, self.tokenizer.pad_token_id,
                                      self.cfg.eval.batch_size, rank=self.accelerator.process_index,
                                      world=1 if self.strategy.collective else self.world)
        if self.is_main:
            self.log.write(done, {"step": done, "validation": metrics},
                           {f"validation/{name}": value for name, value in metrics.items()})
        improved = self.validation.record(done, metrics)
        if self.world > 1:  # process 0's decision everywhere: the same best / patience / stop, the same saves
            improved, state = broadcast_object_list([improved, self.validation.state()])
            self.validation.restore(state)
        if improved and (self.is_main or self.strategy.collective):  # sharded: gathering is collective
            with self.strategy.gathered(model):
                if self.is_main:
                    self.method.save(model, self.tokenizer, self.output_dir / "adapter")

    def _checkpoint(self, done: int) -> None:
        extra = {"validation": self.validation.state()} if self.validation is not None else {}
        state = run_dir.trainer_state(done, self.plan.position(done), self.optimizer_state, self.scheduler, extra)
        with self.strategy.gathered(self.model):
            if self.is_main:
                run_dir.write_checkpoint(self.output_dir, done, functools.partial(self._write_checkpoint, state))

    def _write_checkpoint(self, state: dict, directory: Path) -> None:
        self.method.save(self.accelerator.unwrap_model(self.model), self.tokenizer, directory / "adapter")
        torch.save(state, directory / "trainer_state.pt")

    # ------------------------------------------------------------------------------------- finish
    def finish(self) -> Path:
        """Adapter and run.json (process 0), then optionally evaluate; returns the run directory."""
        self.accelerator.wait_for_everyone()
        with self.strategy.gathered(self.model):
            if self.is_main:
                self.log.close()
                # With validation, adapter/ already holds the best evaluation; the final weights go to adapter_last/.
                final = "adapter" if self.validation is None else "adapter_last"
                self.method.save(self.accelerator.unwrap_model(self.model), self.tokenizer, self.output_dir / final)
                write_json(self.output_dir / "run.json", self._run_record())
        self.accelerator.wait_for_everyone()
        if self.cfg.eval.after_train:  # every process: eval shares the examples out, process 0 writes
            self._evaluate()
        self.accelerator.end_training()
        release_accelerator_state()
        return self.output_dir

    def _run_record(self) -> dict:
        cfg, watch = self.cfg, self.watch
        loop = watch.total(*LOOP_SECTIONS)
        overhead = loop - watch.totals["compute"]  # time outside forward, backward and the optimizer
        return {
            "recipe": cfg.recipe, "method": self.method.name, "model": cfg.model.name_or_path,
            **self.counts, "strategy": cfg.trainer.strategy, "world_size": self.world,
            "accumulation_steps": self.accumulation,
            "steps": self.steps_done, "planned_steps": self.total_steps,
            "steps_this_session": self.steps_done - self.start_step,
            "resumed_from_step": self.start_step or None, "resume_changes": self.resume_changes,
            "nonfinite_steps_skipped": self.guard.skipped, "steps_per_epoch": self.plan.steps_per_epoch,
            "examples": len(self.examples), "final_loss": self.last_loss if math.isfinite(self.last_loss) else None,
            "tokens_seen": self.tokens_seen, "tokens_per_second": self.tokens_seen / max(loop, 1e-9),
            "wall_seconds": time.perf_counter() - self.wall_start,
            "loop_seconds": loop, **{f"{name}_seconds": watch.totals[name] for name in watch.totals},
            "overhead_seconds": overhead, "overhead_percent": 100.0 * overhead / max(loop, 1e-9),
            **run_dir.peak_memory(), "adapter_bytes": run_dir.directory_bytes(self.output_dir / "adapter"),
            **run_dir.source_version(),
            "validation": self.validation.summary(self.steps_done, self.total_steps) if self.validation else None,
        }

    def _evaluate(self) -> None:
        """eval.after_train: the in-memory model (each process holds its own copy), or a reload."""
        from ..eval.runner import run_eval_from_config

        eval_cfg = eval_config_for_run(self.output_dir, [])
        if self.validation is not None or self.strategy.collective:  # best adapter on disk / sharded: reload
            run_eval_from_config(eval_cfg)
            return
        trained = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False).eval()
        eval_cfg.eval.adapter = None  # already on the model; applying it again would stack LoRA
        run_eval_from_config(eval_cfg, model=trained, tokenizer=self.tokenizer)
