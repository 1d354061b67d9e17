"""The training run: plan, data, models, resume, the step loop, checkpoints, export."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from sea_jax import data as data_lib
from sea_jax import sharding as shd
from sea_jax.checkpoint import apply_overrides, stored_config
from sea_jax.config import ConfigError, ModelConfig
from sea_jax.flags import model_overrides
from sea_jax.training import distributed, models, optimizer
from sea_jax.training.checkpointing import StopFlag, TrainCheckpointer
from sea_jax.training.settings import (TrainError, batch_layout, check_same_essentials,
                                       essentials, scratch_config)
from sea_jax.training.metrics import MetricsLog, check_finite
from sea_jax.training.step import StepSpec, base_rng, build_train_step, init_opt_state

CONFIG_FILE = "train_config.json"


@dataclasses.dataclass
class Plan:
  """Everything resolved from the flags before any weights are read."""
  student: ModelConfig
  teacher: ModelConfig | None
  init_path: str | None       # weights the student starts from (None: fresh)
  tokenizer_src: str | None
  spec: StepSpec
  learning_rates: dict[str, float]
  essential: dict[str, Any]


def make_plan(args: argparse.Namespace, mesh_shape: dict[str, int]) -> Plan:
  """Resolves configs and checks them against the flags (no weights read)."""
  flag_overrides = model_overrides(args, skip=("attention",))  # dtype, impls, SEA shape
  common = dict(param_dtype="float32", dropout=args.dropout, remat=args.remat,
                sea_seed=args.seed, **flag_overrides)
  if args.mode in ("distill", "layerwise"):
    teacher_src = stored_config(args.teacher)
    init_path = args.init_from or args.teacher
    base = stored_config(init_path) if args.init_from else teacher_src
    sea_k = {"sea_k": args.sea_k} if args.sea_k is not None else {}
    student = apply_overrides(base, attention=args.attention, **sea_k, **common)
    teacher_flags = {f: v for f, v in flag_overrides.items() if f in ("dtype", "dense_impl")}
    teacher = apply_overrides(teacher_src, attention="dense", param_dtype="float32",
                              dropout=0.0, remat=False, attention_layers=None, **teacher_flags)
    if (teacher.hidden_size, teacher.num_hidden_layers, teacher.num_attention_heads,
        teacher.vocab_size) != (student.hidden_size, student.num_hidden_layers,
                                student.num_attention_heads, student.vocab_size):
      raise TrainError("--init-from and --teacher have different model shapes")
    lrs = {"sea": args.lr_sea, "pretrained": args.lr_pretrained}
    tokenizer_src = args.teacher
  else:
    init_path = args.init_from
    base = stored_config(init_path) if init_path else scratch_config(args)
    student = apply_overrides(base, attention="dense", attention_layers=None, **common)
    teacher = None
    lrs = {"sea": args.lr, "pretrained": args.lr}
    tokenizer_src = init_path or args.tokenizer
  if args.seq_len > student.max_position_embeddings:
    raise TrainError(f"--seq-len {args.seq_len} exceeds the model's max positions "
                     f"{student.max_position_embeddings}")
  micro = batch_layout(args, mesh_shape)
  spec = StepSpec(mode=args.mode, batch_size=args.batch_size, micro_batch_size=micro,
                  seq_len=args.seq_len, K=student.sea.K,
                  sea_k_range=getattr(args, "sea_k_range", None))
  return Plan(student, teacher, init_path, tokenizer_src, spec, lrs, essentials(args, student))


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


def check_config(plan: Plan, out: str, has_checkpoints: bool) -> None:
  """Refuses to resume with settings other than the run's (OUT/train_config.json)."""
  path = os.path.join(out, CONFIG_FILE)
  if has_checkpoints and os.path.isfile(path):
    try:
      with open(path) as f:
        saved = json.load(f).get("essential", {})
    except (OSError, ValueError, AttributeError) as e:
      raise TrainError(f"cannot read {path} ({e}); it records the run's settings: restore it "
                       "or use another --out") from None
    check_same_essentials(saved, plan.essential, path)


def write_config(args, plan: Plan, mesh, out: str, is_writer: bool) -> None:
  """Writes OUT/train_config.json (atomically), once the run's settings are accepted."""
  path = os.path.join(out, CONFIG_FILE)
  if is_writer:
    _write_json(path, {
        "args": vars(args), "essential": plan.essential,
        "student_config": plan.student.to_hf_dict(),
        "teacher_config": plan.teacher.to_hf_dict() if plan.teacher else None,
        "micro_batch_size": plan.spec.micro_batch_size,
        "accumulation_steps": plan.spec.accumulation, "learning_rates": plan.learning_rates,
        "mesh": dict(mesh.shape), "devices": jax.device_count(),
        "processes": jax.process_count(), "backend": jax.default_backend(),
        "jax": jax.__version__})


RUN_FILES = (CONFIG_FILE, "checkpoints", "metrics.jsonl", "final", "cache")  # what a run writes


def check_out_dir(out: str, is_writer: bool) -> None:
  """--out is new, empty or a run folder of train.py (never a folder of the user's files),
  writable, and its run files are readable: checked before any work."""
  from sea_jax.safe_write import DestinationError, check_writable_folder, claim_output_folder
  from sea_jax.training.metrics import DamagedRunFileError, read_records
  try:
    if is_writer:
      claim_output_folder(out, "train.py", "--out", also_ours=RUN_FILES)
    else:
      check_writable_folder(out, "--out")
    read_records(os.path.join(out, "metrics.jsonl"))
  except (DestinationError, DamagedRunFileError) as e:
    raise TrainError(f"{e}; restore it, or start the run in another --out") from None


def check_checkpoint_room(out: str, abstract_params, tx, keep: int) -> None:
  """TrainError before any training when OUT's disk cannot hold one checkpoint (parameters and
  optimizer state) plus final/; a note when it cannot hold the --keep checkpoints."""
  from sea_jax.safe_write import DestinationError, check_room, free_bytes
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  params = nbytes(abstract_params)
  one = params + nbytes(jax.eval_shape(tx.init, abstract_params))
  try:
    check_room(out, one + params, f"--out {out} (one checkpoint and final/)")
  except DestinationError as e:
    raise TrainError(str(e)) from None
  free = free_bytes(out)
  if free < (keep + 1) * one + params and jax.process_index() == 0:
    print(f"note: the disk of {out} has {free / 2**20:.0f} MiB free, less than "
          f"the {((keep + 1) * one + params) / 2**20:.0f} MiB that --keep {keep} checkpoints "
          "may need", file=sys.stderr, flush=True)


def load_tokens(args, plan: Plan, out: str, vocab_size: int, is_writer: bool) -> np.ndarray:
  from sea_jax.checkpoint import model_tokenizer
  tokenizer = (model_tokenizer(plan.tokenizer_src) if plan.tokenizer_src
               else data_lib.load_tokenizer(None))
  cache_dir = args.cache_dir or os.path.join(out, "cache")
  tokens = data_lib.load_training_tokens(args.train_text, tokenizer, cache_dir,
                                         wikitext_raw=args.wikitext_raw,
                                         progress=None if is_writer and not args.no_progress
                                         else False)
  if tokens.size and int(tokens.max()) >= vocab_size:
    raise TrainError(f"the tokenizer produces ids up to {int(tokens.max())} but the model's "
                     f"vocab_size is {vocab_size}")
  return tokens


def _fetch(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


class Runner:
  """One training run; `run()` returns the process exit code."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.out = os.path.abspath(args.out)
    self.is_writer = jax.process_index() == 0

  def log(self, msg: str) -> None:
    if self.is_writer:
      print(msg, file=sys.stderr, flush=True)

  def run(self) -> int:
    args = self.args
    try:
      mesh = shd.make_mesh(args.mesh)
    except ValueError as e:
      raise TrainError(str(e)) from None
    plan = make_plan(args, dict(mesh.shape))
    created = not os.path.exists(self.out)
    self.started = False
    self.lock = None
    try:
      return self._run(plan, mesh)
    except BaseException:
      # A start that failed before training began leaves no new folder behind.
      if created and not self.started and self.is_writer and os.path.isdir(self.out):
        import shutil
        shutil.rmtree(self.out, ignore_errors=True)
      raise
    finally:
      if self.lock is not None:
        self.lock.release()

  def _run(self, plan: Plan, mesh) -> int:
    args = self.args
    spec = plan.spec
    check_out_dir(self.out, self.is_writer)
    os.makedirs(self.out, exist_ok=True)
    if self.is_writer:  # one writer per run folder, for the whole run
      from sea_jax.safe_write import DestinationError, RunLock
      try:
        self.lock = RunLock(self.out, "train.py").acquire()
      except DestinationError as e:
        raise TrainError(str(e)) from None
    ckpt = TrainCheckpointer(os.path.join(self.out, "checkpoints"), args.keep,
                             is_writer=self.is_writer)
    check_config(plan, self.out, bool(ckpt.steps()))

    tokens = load_tokens(args, plan, self.out, plan.student.vocab_size, self.is_writer)
    try:
      sampler = data_lib.WindowSampler(tokens, spec.seq_len, args.seed)
    except ValueError as e:
      raise TrainError(str(e)) from None

    student = models.ModelBridge(plan.student, "sea" if args.freeze_base else "all")
    teacher = models.ModelBridge(plan.teacher) if plan.teacher is not None else None
    tx = optimizer.make_optimizer(plan.learning_rates, args.weight_decay,
                                  schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
                                  total_steps=args.steps)
    p_sh, _ = student.shardings(mesh)
    opt_sh = optimizer.opt_state_shardings(tx, student.abstract_params, p_sh, mesh)
    step_fn = build_train_step(spec, student, teacher, tx, mesh, opt_sh)
    check_checkpoint_room(self.out, student.abstract_params, tx, args.keep)

    state, start = self._restore_or_init(ckpt, plan, student, tx, mesh, opt_sh, sampler)
    teacher_state = None
    if teacher is not None and start < args.steps:  # a finished run needs no teacher
      tp, tr = models.load_weights(args.teacher, teacher, mesh, _overrides(plan.teacher))
      teacher_state = {"params": tp, "rest": tr}
    if start > args.steps:
      self.log(f"note: the run in {self.out} is already at step {start}, past --steps "
               f"{args.steps}: nothing to train (pass a larger --steps to continue)")
    elif start == args.steps:
      self.log(f"note: the run in {self.out} is already complete ({start} steps)")
    write_config(args, plan, mesh, self.out, self.is_writer)
    self.started = True
    metrics_log = MetricsLog(os.path.join(self.out, "metrics.jsonl"), resume_step=start,
                             is_writer=self.is_writer)
    stop = StopFlag().install()
    try:
      code = self._loop(state, start, teacher_state, step_fn, sampler, ckpt, metrics_log,
                        stop, plan, student)
    finally:
      stop.uninstall()
      ckpt.close()
    return code

  def _restore_or_init(self, ckpt, plan, student, tx, mesh, opt_sh, sampler):
    """(state, step): the newest good checkpoint, else fresh optimizer state on the initial
    weights (--init-from / --teacher / random)."""
    abstract_p, abstract_r = student.abstract(mesh)
    abstract_opt = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(tx.init, student.abstract_params), opt_sh)
    rep = shd.replicated(mesh)
    rng = base_rng(self.args.seed)
    abstract = {"params": abstract_p, "rest": abstract_r, "opt": abstract_opt,
                "step": jax.ShapeDtypeStruct((), np.int32, sharding=rep),
                "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep)}
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
      step, state, meta = restored
      check_same_essentials(meta.get("essential", {}), plan.essential, f"checkpoint {step}")
      try:
        sampler.restore(meta["sampler"])
      except ValueError as e:
        raise TrainError(f"checkpoint {step} does not fit this training text: {e}") from None
      self.log(f"resuming from checkpoint at step {step}")
      return state, int(step)
    if plan.init_path:
      params, rest = models.load_weights(plan.init_path, student, mesh, _overrides(plan.student))
    else:
      params, rest = models.fresh_weights(student, mesh)
    state = {"params": params, "rest": rest, "opt": init_opt_state(tx, params, opt_sh),
             "step": jax.device_put(np.int32(0), rep), "rng": jax.device_put(rng, rep)}
    return state, 0

  def _loop(self, state, start, teacher_state, step_fn, sampler, ckpt, metrics_log, stop,
            plan, student) -> int:
    args, spec = self.args, plan.spec
    global_shape = (spec.batch_size, spec.seq_len + 1)
    shard_index, num_shards = distributed.host_rows(step_fn.batch_sharding, global_shape)
    tokens_per_step = spec.batch_size * spec.seq_len
    schedules = {g: optimizer.lr_schedule(lr, args.lr_schedule, args.warmup_steps, args.steps)
                 for g, lr in plan.learning_rates.items()}

    def lr_fields(step: int) -> dict[str, float]:
      """The learning rates the update to `step` used (optax counts updates from 0)."""
      at = {g: float(f(step - 1)) if callable(f) else f for g, f in schedules.items()}
      if spec.mode != "pretrain":
        return {"lr": at["sea"], "lr_sea": at["sea"], "lr_pretrained": at["pretrained"]}
      return {"lr": at["pretrained"]}
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=min(start, args.steps), unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=args.no_progress or not self.is_writer,
               desc=spec.mode)
    saved_step = start
    last = {"time": time.time(), "step": start}
    log_window = {"time": time.time(), "step": start}

    def finish(pending) -> None:
      """Fetch a step's metrics, stop on a non-finite term, log."""
      step, metrics = pending
      values = _fetch(metrics)
      check_finite(step, values)
      now = time.time()
      rate = tokens_per_step * (step - last["step"]) / max(now - last["time"], 1e-9)
      last.update(time=now, step=step)
      bar.update(1)
      bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{rate:,.0f}")
      if step % args.log_every == 0 or step == args.steps:
        window = tokens_per_step * (step - log_window["step"]) / max(now - log_window["time"],
                                                                     1e-9)
        log_window.update(time=now, step=step)
        record = {"step": step, "loss": values.pop("loss")}
        record.update(values)
        record.update(tokens_per_s=window, **lr_fields(step), time=now)
        metrics_log.write(record)

    def save(step: int) -> None:
      nonlocal saved_step
      if step > saved_step:
        ckpt.save(step, state, {"step": step, "sampler": sampler.state(),
                                "essential": plan.essential})
        saved_step = step

    pending = None
    step = start
    try:
      while step < args.steps:
        if stop.is_set():
          break
        rows = sampler.batch(spec.batch_size, shard_index, num_shards)
        batch = distributed.global_batch(rows, step_fn.batch_sharding, global_shape)
        state, metrics = step_fn(state, teacher_state, batch)
        step += 1
        if pending is not None:
          finish(pending)  # the previous step's metrics, while this one runs
        pending = (step, metrics)
        if step % args.save_every == 0 or step == args.steps:
          finish(pending)
          pending = None
          save(step)
      if pending is not None:
        finish(pending)
        pending = None
    finally:
      bar.close()
    if step < args.steps:  # stopped by a signal (here or on another host)
      save(step)
      ckpt.wait()
      self.log(f"stopped by signal at step {step}; checkpoint saved, re-run the same command "
               "to resume")
      return stop.exit_code
    ckpt.wait()
    final = os.path.join(self.out, "final")
    models.export_model(final, student, state["params"], state["rest"], plan.tokenizer_src,
                        is_writer=self.is_writer)
    self.log(f"done: {step} steps; model written to {final}")
    return 0


def _overrides(config: ModelConfig) -> dict:
  """load_pretrained overrides that rebuild exactly `config` from its source checkpoint."""
  over = dict(attention=config.attention, attention_layers=config.attention_layers,
              dtype=config.dtype, param_dtype=config.param_dtype, dropout=config.dropout,
              remat=config.remat, dense_impl=config.dense_impl)
  over.update({f"sea_{f.name}": getattr(config.sea, f.name)
               for f in dataclasses.fields(config.sea)})
  return over


def run(args: argparse.Namespace) -> int:
  try:
    return Runner(args).run()
  except ConfigError as e:
    raise TrainError(str(e)) from None
