"""Where the real pair's time goes: each stage of one SEA layer of the SmolLM2-135M student,
jitted alone on that layer's real q, k, v, against the dense core of the same layer, and the
whole model's forward, side by side in one run.

  python bench/bench_real_stages.py [--student FOLDER] [--lengths 2048 8192] [--layer 15]
                                    [--repeats 3] [--out-md FILE]

Per T: the first WikiText-2 test window (gptq protocol) goes through the dense model to layer
--layer; that layer's q, k, v (RoPE applied, q scaled) feed
  performer  the Performer branch (positions table, ReLU features, causal linear attention),
  encoder    the estimator's encoder (Linear 3d -> 2d, LayerNorm, GELU) and gates,
  mask CNN   the row decoder and the causal CNN -> Ê (N,H,T,K),
  pooled keys  (students with SEAConfig.pooled_keys) the pooled-key scores and their mix,
  top-k      the masked softmax over bins and the grouped top-k -> M̂,
  sparse     the sparse attention on the kept keys (the layer's sparse_impl),
  mix        s_prob, the causal mean and s_mix,
each timed alone (best of --repeats, forward only), beside the whole SEA core and the dense
core on the same inputs. The whole model's eval forward (dense and SEA) gives "the rest of the
model" = whole - layers x core. Stage times sum to a little more than the fused core (each jit
materialises its outputs). A second table gives each call's compiled temp bytes
(`memory_analysis().temp_size_in_bytes`): where a SEA layer's memory goes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import report_files  # noqa: E402
from bench.timing import best_time, compiled_time_and_temp  # noqa: E402


def layer_inputs(model, window, layer: int):
  """q (N,H,T,d) scaled, k, v (N,Hkv,T,d) of `layer` of the dense `model` on window (1,T)."""
  import jax
  import jax.numpy as jnp
  from sea_jax.rope import inv_frequencies, rope_tables
  cfg = model.config

  @jax.jit
  def run(ids):
    out = model(ids, output_hidden_states=True)
    block = model.layers[layer]
    x = block.input_layernorm(out.hidden_states[layer])
    N, T, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (N, T))
    cos, sin = rope_tables(positions, inv_frequencies(cfg.head_dim, cfg.rope_theta,
                                                      cfg.rope_scaling_dict), x.dtype)
    q, k, v = block.self_attn.project(x, cos, sin)
    return q.astype(x.dtype), k, v

  return run(window)


def stage_times(core, q, k, v, repeats: int) -> tuple[dict[str, float], dict[str, int]]:
  """Forward seconds and compiled temp bytes of each stage of the SEA core `core`, each
  jitted alone."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from sea_jax.ops.dense import repeat_kv
  from sea_jax.ops.pooled_keys import pooled_key_logits
  from sea_jax.sea import causal_linear_attention, causal_mean, grouped_topk_mask, relu_features
  from sea_jax.sea.layer import (_performer_values, masked_bin_softmax, position_values,
                                 sparse_dispatch)
  H, T = q.shape[1], q.shape[2]
  W, table = core.features[...], core.positions[...]
  kk = core.k

  @jax.jit
  def performer(q, k, v):
    kh, vh = repeat_kv(k, H), repeat_kv(v, H)
    v_cat = _performer_values(position_values(table, T, core.max_positions), vh)
    c = causal_linear_attention(relu_features(q, W), relu_features(kh, W), v_cat,
                                core.performer_chunk)
    return jnp.concatenate([c.astype(core.dtype), vh.astype(core.dtype)], axis=-1)

  est = core.estimator
  graph, state = nnx.split(est)

  @jax.jit
  def encoder(state, z_in):
    e = nnx.merge(graph, state)
    z = e.encoder(z_in)
    return z, e._gates(z)

  @jax.jit
  def mask_cnn(state, z):
    e = nnx.merge(graph, state)
    return e.cnn(e.decoder(z))

  pooled = None
  if core.pooled is not None:  # SEAConfig.pooled_keys: the pooled-key scores and the mix
    pgraph, pstate = nnx.split(core.pooled)
    pooled = jax.jit(lambda s, logits, q, k: nnx.merge(pgraph, s)(
        logits, pooled_key_logits(q, k, core.K)))
  topk = jax.jit(lambda logits: grouped_topk_mask(masked_bin_softmax(logits), kk))
  sparse = jax.jit(lambda q, k, v, m: sparse_dispatch(core.sparse_impl, q, k, v, m,
                                                      query_block=core.query_block))
  mix = jax.jit(lambda c, v, a, b: b[..., None] * (a[..., None] * c)
                + (1 - b[..., None]) * repeat_kv(causal_mean(v), H))
  z_in = performer(q, k, v)
  z, (s_prob, s_mix) = encoder(state, z_in)
  logits = mask_cnn(state, z)
  cnn_logits = logits
  if pooled is not None:
    logits = pooled(pstate, cnn_logits, q, k)
  mask = topk(logits)
  c_sparse = sparse(q, k, v, mask)
  calls = {"performer": (performer, (q, k, v)), "encoder": (encoder, (state, z_in)),
           "mask CNN": (mask_cnn, (state, z))}
  if pooled is not None:
    calls["pooled keys"] = (pooled, (pstate, cnn_logits, q, k))
  calls.update({"top-k": (topk, (logits,)), "sparse": (sparse, (q, k, v, mask)),
                "mix": (mix, (c_sparse, v, s_prob, s_mix))})
  measured = {name: compiled_time_and_temp(fn, a, repeats) for name, (fn, a) in calls.items()}
  return ({name: m[0] for name, m in measured.items()},
          {name: m[1] for name, m in measured.items()})


def core_time(core, q, k, v, repeats: int) -> tuple[float, int]:
  """Forward seconds and compiled temp bytes of a whole attention core."""
  import jax
  from flax import nnx
  graph, state = nnx.split(core)
  fn = jax.jit(lambda s, q, k, v: nnx.merge(graph, s)(q, k, v)[0])
  return compiled_time_and_temp(fn, (state, q, k, v), repeats)


def model_time(model, window, repeats: int) -> float:
  import jax
  from flax import nnx
  from sea_jax import evaluate
  graph, state = nnx.split(model)
  fn = jax.jit(lambda s, x: evaluate.window_losses(nnx.merge(graph, s), x, None))
  return best_time(fn, (state, window), repeats)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dense", default="smollm2-135m", help="the dense model (default: the GGUF)")
  p.add_argument("--student", help="the SEA student folder (default: the bundled student)")
  p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
  p.add_argument("--layer", type=int, default=15, help="which layer's q, k, v (default 15)")
  p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is kept")
  p.add_argument("--out-md", help="also write the table here")
  p.add_argument("--out-json", help="also write the rows here")
  args = p.parse_args()
  report_files.claim(__file__, args.out_md, args.out_json)
  import jax.numpy as jnp
  from sea_jax import bundle, checkpoint, data
  student_path = args.student or bundle.student_folder()
  dense = checkpoint.load_pretrained(args.dense)
  student = checkpoint.load_pretrained(student_path)
  if not 0 <= args.layer < len(student.layers):
    sys.exit(f"error: --layer {args.layer} is not a layer of the student "
             f"(0..{len(student.layers) - 1})")
  tokens = data.protocol_tokens(checkpoint.model_tokenizer(student_path), "gptq")
  n_layers = len(student.layers)
  rows = []
  for T in args.lengths:
    window = jnp.asarray(data.eval_windows(tokens, T)[:1])
    q, k, v = layer_inputs(dense, window, args.layer)
    sea_core = student.layers[args.layer].self_attn.core
    stages, stage_temp = stage_times(sea_core, q, k, v, args.repeats)
    sea_core, sea_temp = core_time(sea_core, q, k, v, args.repeats)
    dense_core, dense_temp = core_time(dense.layers[args.layer].self_attn.core, q, k, v,
                                       args.repeats)
    row = {"T": T, "stages": stages, "sea_core": sea_core, "dense_core": dense_core,
           "stage_temp_bytes": stage_temp, "sea_core_temp_bytes": sea_temp,
           "dense_core_temp_bytes": dense_temp,
           "sea_model": model_time(student, window, args.repeats),
           "dense_model": model_time(dense, window, args.repeats)}
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  ms = lambda s: f"{1e3 * s:,.1f}"  # noqa: E731
  lines = [f"{report_files.device_line()}; layer {args.layer}'s real q, k, v on the first "
           f"WikiText-2 test window (gptq); forward ms, best of {args.repeats}.", ""]
  names = list(rows[0]["stages"])
  lines += ["| T | " + " | ".join(names) + " | stages sum | SEA core | dense core | "
            f"SEA model | dense model | rest of SEA model ({n_layers} layers) |",
            "|---" * (len(names) + 7) + "|"]
  for r in rows:
    rest = r["sea_model"] - n_layers * r["sea_core"]
    lines.append(f"| {r['T']:,} | " + " | ".join(ms(r["stages"][n]) for n in names)
                 + f" | {ms(sum(r['stages'].values()))} | {ms(r['sea_core'])} | "
                 f"{ms(r['dense_core'])} | {ms(r['sea_model'])} | {ms(r['dense_model'])} | "
                 f"{ms(rest)} |")
  mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
  lines += ["", "Compiled temp MiB of the same jitted calls (one layer's attention):", "",
            "| T | " + " | ".join(names) + " | SEA core | dense core | SEA/dense |",
            "|---" * (len(names) + 4) + "|"]
  for r in rows:
    lines.append(f"| {r['T']:,} | " + " | ".join(mib(r["stage_temp_bytes"][n]) for n in names)
                 + f" | {mib(r['sea_core_temp_bytes'])} | {mib(r['dense_core_temp_bytes'])} | "
                 f"{r['sea_core_temp_bytes'] / max(r['dense_core_temp_bytes'], 1):.1f}x |")
  report_files.publish(__file__, "\n".join(lines), args.out_md, args.out_json, {"rows": rows})


if __name__ == "__main__":
  main()
