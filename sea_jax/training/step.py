"""The jitted train step: distillation (SEA student vs frozen dense teacher) or plain pretraining.

State (a pytree of pure dicts, what the checkpoints hold):
  {"params": trainable params, "rest": fixed variables, "opt": optax state, "step": int32 (),
   "rng": uint32 key data of the run's base key, key(seed)}
`step` counts optimizer updates done. One call consumes one global batch (B, T+1) of token
windows, split into B / micro_batch_size accumulation steps run by `lax.scan`; gradients and
loss terms are averaged over them, then one AdamW update is applied.

Dropout key of micro-step i of update s: fold_in(fold_in(key(seed), s), i): a pure function of
(seed, step, micro-step), so a resumed run draws the same masks, and (threefry being
partitionable) the same on any mesh. The base key rides in the state (not in the program), so
runs that differ only in seed share one compiled step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sea_jax import losses
from sea_jax import sharding as shd
from sea_jax.decoder import attention_cores
from sea_jax.training.models import ModelBridge

MODES = ("distill", "layerwise", "pretrain")


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static settings of the train step."""
  mode: str
  batch_size: int
  micro_batch_size: int
  seq_len: int
  K: int = 256
  loss_query_block: int | None = None  # None: blocked_attention.pick_block
  sea_k_range: tuple[int, int] | None = None  # dynamic-k training: k drawn per update

  @property
  def accumulation(self) -> int:
    return self.batch_size // self.micro_batch_size


K_STREAM = 0x5EA  # fold_in tag of the dynamic-k draws (dropout keys use the micro index)


def draw_sea_k(rng: jax.Array, step: jax.Array, lo: int, hi: int) -> jax.Array:
  """int32 () k of update `step`, log-uniform in [lo, hi]: a pure function of (seed, step), the
  same on every device and micro-step, so a resumed run draws the same k."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), K_STREAM), step)
  u = jax.random.uniform(key, (), jnp.float32)
  k = jnp.exp(jnp.log(float(lo)) + u * (jnp.log(float(hi + 1)) - jnp.log(float(lo))))
  return jnp.clip(jnp.floor(k).astype(jnp.int32), lo, hi)


def base_rng(seed: int) -> jax.Array:
  """The state's "rng" entry: raw uint32 data of key(seed) (checkpoint-friendly)."""
  return jax.random.key_data(jax.random.key(seed))


def dropout_key(rng: jax.Array, step: jax.Array, micro: jax.Array) -> jax.Array:
  """The dropout key of micro-step `micro` of update `step` (0-based, before the update);
  rng: the state's base key data."""
  key = jax.random.wrap_key_data(rng)
  return jax.random.fold_in(jax.random.fold_in(key, step), micro)


def _distill_loss(spec: StepSpec, student: ModelBridge, teacher: ModelBridge):
  def loss(params, rest, teacher_state, tokens, key, sea_k=None):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    t_model = teacher.merge(teacher_state["params"], teacher_state["rest"])
    t_out = jax.lax.stop_gradient(t_model(inputs, output_hidden_states=True,
                                          return_attn_aux=True))
    s_model = student.merge(params, rest)
    s_out = s_model(inputs, sea_k=sea_k, dropout_rng=key, output_hidden_states=True,
                    return_attn_aux=True)
    return losses.distillation_loss(t_out, s_out, targets, K=spec.K,
                                    query_block=spec.loss_query_block)
  return loss


def _layerwise_loss(spec: StepSpec, student: ModelBridge, teacher: ModelBridge):
  """The attention warm-up: every student attention core runs on its teacher layer's own
  q, k, v (teacher forcing, all layers at once from one teacher forward) and learns L_approx +
  L_context (`losses.layerwise_loss`); the rest of the student model is not run."""
  def loss(params, rest, teacher_state, tokens, key, sea_k=None):
    del key  # the cores have no dropout
    inputs = tokens[:, :-1]
    t_model = teacher.merge(teacher_state["params"], teacher_state["rest"])
    t_aux = jax.lax.stop_gradient(t_model(inputs, return_attn_aux=True).attn_aux)
    s_cores = attention_cores(student.merge(params, rest))
    s_aux = [core(ta["q"], ta["k"], ta["v"], sea_k=sea_k, return_aux=True)[1]
             for core, ta in zip(s_cores, t_aux)]
    return losses.layerwise_loss(t_aux, s_aux, K=spec.K, query_block=spec.loss_query_block)
  return loss


def _pretrain_loss(student: ModelBridge):
  def loss(params, rest, teacher_state, tokens, key, sea_k=None):
    del teacher_state, sea_k
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = student.merge(params, rest)(inputs, dropout_rng=key).logits
    ce = losses.lm_loss(logits, targets)
    return ce, {"ce": ce, "total": ce}
  return loss


def make_loss_fn(spec: StepSpec, student: ModelBridge, teacher: ModelBridge | None) -> Callable:
  """loss(params, rest, teacher_state, tokens (n, T+1), key|None, sea_k=None) -> (total, terms)."""
  if spec.mode in ("distill", "layerwise"):
    if teacher is None:
      raise ValueError(f"{spec.mode} needs a teacher")
    return (_distill_loss if spec.mode == "distill" else _layerwise_loss)(spec, student, teacher)
  if spec.mode == "pretrain":
    return _pretrain_loss(student)
  raise ValueError(f"unknown mode {spec.mode!r}; expected one of {MODES}")


def train_step_fn(spec: StepSpec, student: ModelBridge, teacher: ModelBridge | None,
                  tx: optax.GradientTransformation, mesh: Mesh, param_shardings: Any) -> Callable:
  """step(state, teacher_state, batch (B, T+1) int32) -> (state, metrics), not yet jitted."""
  loss_fn = make_loss_fn(spec, student, teacher)
  use_dropout = student.config.dropout > 0.0
  A = spec.accumulation
  micro_sharding = NamedSharding(mesh, P(None, shd.BATCH_AXES, None))

  def step(state, teacher_state, batch):
    with shd.ambient(mesh):  # kernels and the tile list run per device shard (`per_shard`)
      return _step(state, teacher_state, batch)

  def _step(state, teacher_state, batch):
    params, rest = state["params"], state["rest"]
    # Micro-batch a takes rows a, A + a, 2A + a, ...: every device keeps its own rows.
    micro = batch.reshape(spec.micro_batch_size, A, batch.shape[-1]).swapaxes(0, 1)
    micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    sea_k = None
    if spec.sea_k_range is not None:
      sea_k = draw_sea_k(state["rng"], state["step"], *spec.sea_k_range)

    def one(i, tokens):
      key = dropout_key(state["rng"], state["step"], i) if use_dropout else None
      (_, terms), grads = grad_fn(params, rest, teacher_state, tokens, key, sea_k)
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
      return terms, grads

    if A == 1:
      terms, grads = one(jnp.int32(0), micro[0])
    else:
      shapes = jax.eval_shape(one, jnp.int32(0), micro[0])
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      zeros = (zeros[0], jax.lax.with_sharding_constraint(zeros[1], param_shardings))

      def body(acc, xs):
        out = one(*xs)
        return jax.tree.map(jnp.add, acc, out), None

      (terms, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(A, dtype=jnp.int32), micro))
      terms, grads = jax.tree.map(lambda x: x / A, (terms, grads))

    updates, opt = tx.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = dict(terms)
    metrics["loss"] = terms["total"]
    metrics["grad_norm"] = optax.global_norm(grads)
    if sea_k is not None:
      metrics["sea_k"] = sea_k
    new_state = dict(state, params=new_params, opt=opt, step=state["step"] + 1)
    return new_state, metrics

  return step


@dataclasses.dataclass
class TrainStep:
  """The jitted step with explicit shardings, and the trees they describe."""
  fn: Callable
  state_shardings: Any
  teacher_shardings: Any
  batch_sharding: NamedSharding

  def __call__(self, state, teacher_state, batch):
    return self.fn(state, teacher_state, batch)


def build_train_step(spec: StepSpec, student: ModelBridge, teacher: ModelBridge | None,
                     tx: optax.GradientTransformation, mesh: Mesh, opt_shardings: Any,
                     donate: bool = True) -> TrainStep:
  """`jax.jit` of the step: state and teacher sharded by the logical-axis table, the optimizer
  state like its parameters, the batch over data x fsdp; the state is donated."""
  p_sh, r_sh = student.shardings(mesh)
  rep = shd.replicated(mesh)
  state_sh = {"params": p_sh, "rest": r_sh, "opt": opt_shardings, "step": rep, "rng": rep}
  if teacher is not None:
    tp, tr = teacher.shardings(mesh)
    teacher_sh = {"params": tp, "rest": tr}
  else:
    teacher_sh = None
  batch_sh = shd.batch_sharding(mesh)
  fn = train_step_fn(spec, student, teacher, tx, mesh, p_sh)
  jitted = jax.jit(fn, in_shardings=(state_sh, teacher_sh, batch_sh),
                   out_shardings=(state_sh, rep), donate_argnums=(0,) if donate else ())
  return TrainStep(jitted, state_sh, teacher_sh, batch_sh)


def init_opt_state(tx: optax.GradientTransformation, params: Any, opt_shardings: Any) -> Any:
  """tx.init(params), created directly in the optimizer state's sharding."""
  return jax.jit(tx.init, out_shardings=opt_shardings)(params)
