"""SEA under a device mesh: sparse attention runs per (batch, head) shard (`sharding.per_shard`),
with no all-gather of q, k, v, and gives what one device gives; a sharded SEA model's eval too."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import relative_error
from hf_models import save_tiny_opt
from sea_jax import checkpoint, convert, evaluate
from sea_jax import sharding as shd
from sea_jax.sea import grouped_topk_mask, sparse_dispatch

MESH = "data=2,fsdp=2,tensor=2"


def _inputs(rng, N=4, H=4, Hkv=2, T=300, d=16, K=32, k=4):
  q = jnp.asarray(rng.standard_normal((N, H, T, d)) * d ** -0.5, jnp.float32)
  kk, v = (jnp.asarray(rng.standard_normal((N, Hkv, T, d)), jnp.float32) for _ in range(2))
  probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((N, H, T, K)) * 3), axis=-1)
  return q, kk, v, grouped_topk_mask(probs, k)


def _gathers(compiled) -> int:
  return compiled.as_text().count("all-gather")


@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_sparse_attention_runs_per_shard(rng, impl):
  """Forward and gradients on a data x fsdp x tensor mesh equal one device's; the compiled
  program gathers nothing (before `per_shard`, XLA all-gathered the tile list's q, k, v and
  mask onto every device: 72 all-gathers, every device doing the whole batch)."""
  mesh = shd.make_mesh(MESH)
  args = _inputs(rng)
  sharded = [jax.device_put(x, NamedSharding(mesh, P(shd.BATCH_AXES, "tensor"))) for x in args]

  def attend(q, k, v, cm):
    return sparse_dispatch(impl, q, k, v, cm, query_block=64)

  def on_mesh(fn):
    def run(*a):
      with shd.ambient(mesh):
        return fn(*a)
    return run

  loss = lambda fn: lambda q, k, v, cm: jnp.sum(fn(q, k, v, cm) ** 2)  # noqa: E731
  grads = lambda fn: jax.grad(loss(fn), (0, 1, 2))  # noqa: E731
  for fn in (attend, grads(attend)):
    want = jax.jit(fn)(*args)
    compiled = jax.jit(on_mesh(fn)).lower(*sharded).compile()
    assert _gathers(compiled) == 0, f"{impl}: the sharded program gathers"
    got = compiled(*sharded)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert relative_error(g, w) <= 1e-5
  out = jax.jit(on_mesh(attend))(*sharded)
  assert out.sharding.spec == P(shd.BATCH_AXES, "tensor")


def test_per_shard_runs_a_pallas_kernel_and_falls_back_where_axes_do_not_divide(rng):
  from pallas_kernels import sparse_attention as pallas_sparse
  mesh = shd.make_mesh(MESH)
  q, k, v, cm = _inputs(rng, T=64, K=16)
  kernel = lambda q, k, v, cm: pallas_sparse(q, k, v, cm, interpret=True)  # noqa: E731
  want = jax.jit(kernel)(q, k, v, cm)

  @jax.jit
  def run(q, k, v, cm):
    with shd.ambient(mesh):
      return shd.per_shard(kernel, q, k, v, cm)

  # (the arrays live on the mesh, as the model's activations do under evaluate and train)
  put = lambda spec, *xs: [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]  # noqa: E731
  assert relative_error(run(*put(P(shd.BATCH_AXES, "tensor"), q, k, v, cm)), want) <= 1e-6
  # 3 batch rows do not divide data x fsdp = 4: the batch stays whole, heads still split
  three = put(P(None, "tensor"), *(x[:3] for x in (q, k, v, cm)))
  assert relative_error(run(*three), want[:3]) <= 1e-6
  # outside any mesh it is the plain call
  assert relative_error(shd.per_shard(kernel, q, k, v, cm), want) <= 1e-6


def test_sea_model_eval_on_a_mesh_equals_one_device(tmp_path):
  save_tiny_opt(str(tmp_path / "hf"), "pre", seed=3, init_std=0.2)
  convert.hf_to_model_folder(str(tmp_path / "hf"), str(tmp_path / "dense"))
  windows = np.random.default_rng(0).integers(0, 1000, (8, 120)).astype(np.int32)
  results = []
  for spec, devices in ((MESH, None), (None, jax.devices()[:1])):
    mesh = shd.make_mesh(spec, devices)
    model = checkpoint.load_model(str(tmp_path / "dense"), mesh, attention="sea", sea_K=16,
                                  sea_k=2, sea_query_block=32, sea_sparse_impl="xla")
    results.append(evaluate.perplexity(model, windows, batch_size=4, mesh=mesh, progress=False))
  sharded, single = results
  assert abs(sharded.mean_nll - single.mean_nll) <= 1e-5 * abs(single.mean_nll)


def test_grouped_topk_per_shard_keeps_heads_whole_with_a_traced_k(rng):
  mesh = shd.make_mesh(MESH)
  probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((4, 4, 200, 32)) * 3), axis=-1)
  sharded = jax.device_put(probs, NamedSharding(mesh, P(shd.BATCH_AXES, "tensor")))

  @jax.jit
  def mask(p, k):
    with shd.ambient(mesh):
      return shd.per_shard(lambda x: grouped_topk_mask(x, k), p, split_heads=False)

  for k in (2, 5):
    assert np.array_equal(mask(sharded, jnp.int32(k)), grouped_topk_mask(probs, k))


def test_data_parallel_sea_eval_step_gathers_nothing():
  """Replicated parameters, batch over 8 devices: nothing needs gathering, and nothing is
  (without `per_shard` the tile list and `lax.top_k` made XLA gather 168 times)."""
  from flax import nnx

  from sea_jax.config import OPTConfig, SEAConfig
  from sea_jax.evaluate import window_losses
  mesh = shd.make_mesh("data=8")
  cfg = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                  ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64, dropout=0.0,
                  attention="sea", sea=SEAConfig(K=16, k=4, query_block=32, sparse_impl="xla"))
  graph, state = nnx.split(checkpoint.build_model(cfg, nnx.Rngs(0)))
  state = jax.device_put(state, shd.replicated(mesh))
  ids = np.random.default_rng(0).integers(0, 512, (8, 256)).astype(np.int32)
  ids = jax.device_put(ids, shd.batch_sharding(mesh))

  def step(state, ids):
    with shd.ambient(mesh):
      return window_losses(nnx.merge(graph, state), ids, None)

  compiled = jax.jit(step).lower(state, ids).compile()
  assert _gathers(compiled) == 0
  want = jax.jit(lambda s, x: window_losses(nnx.merge(graph, s), x, None))(
      jax.device_put(state, jax.devices()[0]), jax.device_put(ids, jax.devices()[0]))
  assert relative_error(compiled(state, ids), want) <= 1e-5
