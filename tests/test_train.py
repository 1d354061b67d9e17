"""train.py and sea_jax.training: optimizer groups, sharded step, resume, signals, data."""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import train_support as ts
from conftest import relative_error
from sea_jax import checkpoint
from sea_jax import sharding as shd
from sea_jax.config import OPTConfig, SEAConfig
from sea_jax.training import cli, models, optimizer
from sea_jax.training.step import (StepSpec, base_rng, build_train_step, draw_sea_k,
                                   init_opt_state)

TINY = OPTConfig(vocab_size=50272, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.1,
                 attention="sea", sea=SEAConfig(K=16, k=4))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return ts.shared_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(shared):
  root, teacher, text, cache = shared
  return ts.reference_run(root, teacher, text, cache)


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------- optimizer


def test_weight_decay_mask_excludes_norms_and_biases():
  params = _flat(optimizer.decay_mask(models.ModelBridge(TINY).abstract_params))
  for path, decayed in params.items():
    if "norm" in path or path.endswith("['bias']"):
      assert not decayed, path
    if path.endswith("['kernel']") or "embed_" in path or path.endswith("['positions']"):
      assert decayed, path
  assert any(params.values()) and not all(params.values())


def test_labels_split_sea_and_pretrained():
  labels = _flat(optimizer.param_labels(models.ModelBridge(TINY).abstract_params))
  for path, label in labels.items():
    assert label == ("sea" if "['core']" in path else "pretrained"), path
  assert {"sea", "pretrained"} == set(labels.values())
  assert labels["['layers'][0]['self_attn']['q_proj']['kernel']"] == "pretrained"
  assert labels["['layers'][0]['self_attn']['core']['positions']"] == "sea"


def _one_update(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree.map(lambda p, u: p + u, params, updates)


@pytest.mark.parametrize("group", ["sea", "pretrained"])
def test_each_group_gets_its_learning_rate(group):
  abstract = models.ModelBridge(TINY).abstract_params
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)
  labels = optimizer.param_labels(abstract)
  grads = jax.tree.map(lambda p, l: jnp.ones_like(p) * (l == group), params, labels)
  lrs = {"sea": 1e-2, "pretrained": 1e-4}
  tx = optimizer.make_optimizer(lrs, weight_decay=0.0)
  new = _one_update(tx, params, grads)
  for (path, p), l in zip(_flat(new).items(), jax.tree.leaves(labels)):
    expected = 1.0 - lrs[group] if l == group else 1.0  # Adam's first step moves by ~lr
    np.testing.assert_allclose(np.asarray(p), expected, rtol=1e-6, err_msg=path)


def test_weight_decay_applies_only_where_masked():
  abstract = models.ModelBridge(TINY).abstract_params
  params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), abstract)
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = optimizer.make_optimizer({"sea": 1e-2, "pretrained": 1e-3}, weight_decay=0.1)
  new = _flat(_one_update(tx, params, grads))
  mask = _flat(optimizer.decay_mask(abstract))
  labels = _flat(optimizer.param_labels(abstract))
  for path, p in new.items():
    lr = 1e-2 if labels[path] == "sea" else 1e-3
    expected = 2.0 * (1 - lr * 0.1) if mask[path] else 2.0
    np.testing.assert_allclose(np.asarray(p), expected, rtol=1e-6, err_msg=path)


def test_opt_state_follows_param_sharding():
  mesh = shd.make_mesh("data=2,fsdp=2,tensor=2")
  bridge = models.ModelBridge(TINY)
  p_sh, _ = bridge.shardings(mesh)
  tx = optimizer.make_optimizer({"sea": 1e-3, "pretrained": 1e-4}, 0.01)
  opt_sh = _flat(optimizer.opt_state_shardings(tx, bridge.abstract_params, p_sh, mesh))
  emb = [s for k, s in opt_sh.items() if k.endswith(".mu['embed_tokens']")]
  assert emb and emb[0].spec == p_sh["embed_tokens"].spec == P("tensor", "fsdp")
  fc1 = [s for k, s in opt_sh.items() if k.endswith(".nu['layers'][1]['fc1']['kernel']")]
  assert fc1[0].spec == P("fsdp", "tensor")
  counts = [s for k, s in opt_sh.items() if k.endswith(".count")]
  assert counts and all(s.spec == P() for s in counts)


# ---------------------------------------------------------------- sharded step


def _step_on(mesh, teacher_dir, batch, student_weights):
  """One distillation step on `mesh` from the given student weights -> (params, metrics)."""
  t_cfg = dataclasses.replace(TINY, attention="dense", dropout=0.0)
  student, teacher = models.ModelBridge(TINY), models.ModelBridge(t_cfg)
  # eps 1e-3: Adam's first step would turn rounding noise in exactly-zero gradients (e.g. a
  # bias right before a LayerNorm) into full-size +-lr updates; the step, not Adam, is tested.
  tx = optimizer.make_optimizer({"sea": 1e-3, "pretrained": 1e-4}, 0.01, eps=1e-3)
  p_sh, r_sh = student.shardings(mesh)
  opt_sh = optimizer.opt_state_shardings(tx, student.abstract_params, p_sh, mesh)
  spec = StepSpec("distill", batch_size=8, micro_batch_size=4, seq_len=32, K=16)
  step = build_train_step(spec, student, teacher, tx, mesh, opt_sh, donate=False)
  tp, tr = models.load_weights(str(teacher_dir), teacher, mesh,
                               dict(attention="dense", dropout=0.0, sea_K=16, sea_k=4))
  params = jax.device_put(student_weights[0], p_sh)
  rest = jax.device_put(student_weights[1], r_sh)
  state = {"params": params, "rest": rest, "opt": init_opt_state(tx, params, opt_sh),
           "step": jnp.int32(5), "rng": base_rng(3)}
  new, metrics = step(state, {"params": tp, "rest": tr},
                      jax.device_put(batch, step.batch_sharding))
  return jax.device_get(new["params"]), jax.device_get(metrics)


def _student_weights(teacher_dir):
  """The teacher's weights plus fresh SEA modules (built eagerly on the host)."""
  from flax import nnx
  from sea_jax.opt import OPTForCausalLM
  bridge = models.ModelBridge(TINY)
  with jax.default_device(jax.devices("cpu")[0]):
    params, rest = bridge.split(OPTForCausalLM(TINY, rngs=nnx.Rngs(0)))
  dense = checkpoint.load_model(str(teacher_dir))
  dense_params = checkpoint.flatten(nnx.to_pure_dict(nnx.state(dense, nnx.Param)))
  flat = checkpoint.flatten(params)
  for path in flat:
    if "core" not in path:
      flat[path] = dense_params[path]
  return jax.device_get((checkpoint.unflatten(flat), rest))


def test_sharded_step_matches_single_device(shared):
  _, teacher_dir, _, _ = shared
  weights = _student_weights(teacher_dir)
  batch = np.random.default_rng(0).integers(0, 50272, (8, 33)).astype(np.int32)
  p1, m1 = _step_on(shd.make_mesh(None, jax.devices()[:1]), teacher_dir, batch, weights)
  p8, m8 = _step_on(shd.make_mesh("data=2,fsdp=2,tensor=2"), teacher_dir, batch, weights)
  for term in ("loss", "ce", "hidden", "kl", "layer", "approx", "prob", "context", "grad_norm"):
    # atol: "prob" is a ~1e-7 difference of nearly equal maps, only its absolute error is small
    np.testing.assert_allclose(m8[term], m1[term], rtol=1e-5, atol=1e-6 * m1["loss"],
                               err_msg=term)
  for (path, a), b in zip(_flat(p1).items(), jax.tree.leaves(p8)):
    assert relative_error(b, a) < 1e-5, path
  moved = [relative_error(a, b) for a, b in zip(jax.tree.leaves(p1),
                                                jax.tree.leaves(weights[0]))]
  assert max(moved) > 1e-4  # the step did change the parameters


def test_dynamic_k_draws_are_log_uniform_in_range_and_reproducible():
  rng = base_rng(3)
  ks = np.array([int(draw_sea_k(rng, jnp.int32(s), 16, 512)) for s in range(400)])
  assert ks.min() >= 16 and ks.max() <= 512
  again = [int(draw_sea_k(rng, jnp.int32(s), 16, 512)) for s in range(400)]
  assert ks.tolist() == again  # a pure function of (seed, step): a resume draws the same k
  # log-uniform: each octave of [16, 512] gets about a fifth of the draws
  octaves = np.histogram(np.log2(ks), bins=[4, 5, 6, 7, 8, 9.01])[0] / len(ks)
  assert np.all(np.abs(octaves - 0.2) < 0.08), octaves
  assert {int(draw_sea_k(rng, jnp.int32(s), 5, 5)) for s in range(5)} == {5}


# ---------------------------------------------------------------- CLI input checks


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "/no/such/teacher"], "not found"),
    (["--sea-K", "10"], "multiple of 4"),
    (["--sea-k", "0"], "--sea-k must be >= 1"),
    (["--sea-k-train", "8"], "--sea-k-train wants LO,HI"),
    (["--sea-k-train", "9,4"], "1 <= LO <= HI"),
    (["--sea-k-train", "2,8", "--attention", "performer"], "SEA student only"),
    (["--seq-len", "256"], "exceeds the model's max positions 128"),
    (["--batch-size", "4"], "not divisible by the data x fsdp size 8"),
    (["--batch-size", "16", "--micro-batch-size", "6"], "not divisible by --micro-batch-size"),
    (["--batch-size", "16", "--micro-batch-size", "4"], "--micro-batch-size 4 is not divisible"),
])
def test_bad_input_is_one_line_error(shared, tmp_path, capsys, extra, message):
  _, teacher, text, _ = shared
  argv = ["--teacher", str(teacher), "--out", str(tmp_path / "o"), "--steps", "2",
          "--seq-len", "32", "--batch-size", "8", "--train-text", str(text), "--sea-K", "16",
          *extra]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_bad_input_subprocess_has_no_traceback(tmp_path):
  proc = ts.run_train(["--teacher", tmp_path / "missing", "--out", tmp_path / "o", "--steps", 1],
                      check=False)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --teacher not found")


def test_resume_with_different_essentials_is_an_error(shared, reference, tmp_path, capsys):
  _, teacher, text, _ = shared
  out = tmp_path / "copy"
  shutil.copytree(reference, out)
  argv = [str(a) for a in ts.distill_args(teacher, text, out)]
  argv[argv.index("--seq-len") + 1] = "64"
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "cannot resume" in err[-1] and "seq_len: 32 -> 64" in err[-1]


# ---------------------------------------------------------------- end to end (subprocesses)


def _assert_same_params(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for key in a:
    assert np.array_equal(a[key], b[key]), key


def _assert_metrics(records: list[dict], steps: list[int], distill: bool = True) -> None:
  assert [r["step"] for r in records] == steps
  for r in records:
    for key in ts.METRIC_KEYS + (ts.DISTILL_TERMS if distill else ("ce",)):
      assert key in r, key


def test_reference_run_outputs(reference):
  config = json.loads((reference / "train_config.json").read_text())
  assert config["args"]["steps"] == 4 and config["accumulation_steps"] == 2
  assert config["essential"]["sea_K"] == 16
  assert ts.checkpoint_steps(reference) == [2, 4]
  _assert_metrics(ts.read_metrics(reference), [1, 2, 3, 4])
  params = ts.final_params(reference)
  assert any("core" in k for k in params) and all(np.isfinite(v).all() for v in params.values())


def test_sigkill_after_save_resumes_bitwise(shared, reference, tmp_path):
  _, teacher, text, cache = shared
  out = tmp_path / "killed"
  proc = ts.start_train(ts.distill_args(teacher, text, out), devices=8, cache_dir=cache,
                        pause=2)
  ts.wait_for(lambda: 2 in ts.checkpoint_steps(out), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert max(ts.checkpoint_steps(out)) < 4, "killed too late to test a resume"
  ts.run_train(ts.distill_args(teacher, text, out), devices=8, cache_dir=cache)
  _assert_same_params(ts.final_params(out), ts.final_params(reference))
  got, want = ts.read_metrics(out), ts.read_metrics(reference)
  _assert_metrics(got, [1, 2, 3, 4])
  assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_sigkill_during_a_save_resumes_bitwise(shared, reference, tmp_path):
  """Killed while Orbax writes a checkpoint (its temporary folder exists): the half-written step
  is never used, and the resumed run ends bitwise where the uninterrupted one did."""
  _, teacher, text, cache = shared
  out = tmp_path / "killed_in_save"
  folder = out / "checkpoints"
  proc = ts.start_train(ts.distill_args(teacher, text, out, extra=["--save-every", 1]),
                        devices=8, cache_dir=cache)
  saving = lambda: folder.is_dir() and any("tmp" in p.name for p in folder.iterdir())
  ts.wait_for(saving, proc, poll=0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  left = sorted(p.name for p in folder.iterdir())
  assert any("tmp" in name for name in left), f"not killed inside a save: {left}"
  assert max(ts.checkpoint_steps(out), default=0) < 4, "killed too late to test a resume"
  proc = ts.run_train(ts.distill_args(teacher, text, out), devices=8, cache_dir=cache)
  assert not any("tmp" in p.name for p in folder.iterdir())
  _assert_same_params(ts.final_params(out), ts.final_params(reference))
  _assert_metrics(ts.read_metrics(out), [1, 2, 3, 4])


def test_sigterm_saves_then_resume_matches(shared, reference, tmp_path):
  _, teacher, text, cache = shared
  out = tmp_path / "term"
  args = ts.distill_args(teacher, text, out, extra=["--save-every", 100])
  proc = ts.start_train(args, devices=8, cache_dir=cache, pause=2)
  ts.wait_for(lambda: len(ts.read_metrics(out)) >= 1, proc)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
  reached = ts.read_metrics(out)[-1]["step"]
  assert 1 <= reached < 4 and ts.checkpoint_steps(out) == [reached]
  before = ts.read_metrics(out)
  ts.run_train(args, devices=8, cache_dir=cache)
  after = ts.read_metrics(out)
  assert after[:len(before)] == before  # appended, not rewritten
  _assert_metrics(after, [1, 2, 3, 4])
  _assert_same_params(ts.final_params(out), ts.final_params(reference))


def test_corrupt_newest_checkpoint_falls_back(shared, reference, tmp_path):
  _, teacher, text, cache = shared
  out = tmp_path / "corrupt"
  shutil.copytree(reference, out)
  shutil.rmtree(out / "final")
  data_files = [p for p in (out / "checkpoints" / "4" / "state").rglob("*")
                if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:  # truncate the array data of the newest checkpoint
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 2)
  proc = ts.run_train(ts.distill_args(teacher, text, out), devices=8, cache_dir=cache)
  assert "warning: checkpoint at step 4 is corrupt" in proc.stderr
  assert "resuming from checkpoint at step 2" in proc.stderr
  assert "Event loop is closed" not in proc.stderr
  assert (out / "checkpoints-corrupt" / "4").is_dir()
  _assert_same_params(ts.final_params(out), ts.final_params(reference))
  _assert_metrics(ts.read_metrics(out), [1, 2, 3, 4])


def test_eval_reads_final(reference):
  proc = ts.subprocess.run(
      [ts.sys.executable, str(ts.REPO / "eval.py"), "--model", str(reference / "final"),
       "--seq-len", "32", "--max-windows", "2", "--batch-size", "1", "--no-progress",
       "--data-source", "bundled"],
      cwd=ts.REPO, env=ts.child_env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = json.loads(proc.stdout.strip().splitlines()[-1])
  assert line["attention"] == "sea" and np.isfinite(line["perplexity"])


# ---------------------------------------------------------------- learning on real text


@pytest.fixture(scope="module")
def pretrained(shared):
  """30 steps of dense pretraining from scratch (one device); its final/ is a teacher."""
  root, _, text, cache = shared
  out = root / "pretrain"
  if not (out / "final" / "config.json").is_file():
    ts.run_train(["--mode", "pretrain", "--layers", 2, "--d-model", 32, "--heads", 4,
                  "--ffn", 64, "--max-positions", 128, "--train-text", text, "--out", out,
                  "--steps", 30, "--seq-len", 32, "--batch-size", 8, "--lr", 3e-3,
                  "--save-every", 30], cache_dir=cache)
  return out


def _falls(records, margin):
  losses = [r["loss"] for r in records]
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < first - margin, (first, last, losses)


def test_loss_falls_pretrain(pretrained):
  records = ts.read_metrics(pretrained)
  _assert_metrics(records, list(range(1, 31)), distill=False)
  _falls(records, margin=1.0)


def test_loss_falls_distill(shared, pretrained, tmp_path):
  """Distil from the 30-step pretrained teacher (the reference run's compiled step, another seed).

  The student starts as the teacher, so its CE is set by the batch, not by training; what
  distillation lowers is the rest of the loss (5 hidden + 0.2 KL + layer losses)."""
  _, _, text, cache = shared
  out = tmp_path / "distill"
  ts.run_train(ts.distill_args(pretrained / "final", text, out, steps=30,
                               extra=["--seed", 1, "--save-every", 30]), devices=8,
               cache_dir=cache)
  records = ts.read_metrics(out)
  _assert_metrics(records, list(range(1, 31)))
  distill = [{"step": r["step"], "loss": r["loss"] - 0.1 * r["ce"]} for r in records]
  _falls(distill, margin=0.2 * distill[0]["loss"])
  _falls([{"loss": r["layer"]} for r in records], margin=0.3 * records[0]["layer"])


def test_nan_loss_stops_naming_step_and_terms(shared, tmp_path):
  root, _, text, cache = shared
  out = tmp_path / "nan"
  proc = ts.run_train(["--mode", "pretrain", "--layers", 2, "--d-model", 32, "--heads", 4,
                       "--ffn", 64, "--max-positions", 128, "--train-text", text, "--out", out,
                       "--steps", 6, "--seq-len", 32, "--batch-size", 8, "--lr", 1e30,
                       "--save-every", 1], cache_dir=cache, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite loss at step ") and "ce=" in last, last
  bad = int(last.split("at step ")[1].split(":")[0])
  steps = ts.checkpoint_steps(out)
  assert all(s < bad for s in steps) and not (out / "final").exists()
  assert "Traceback" not in proc.stderr


def test_lr_schedule_warmup_and_cosine_values():
  f = optimizer.lr_schedule(1e-3, "cosine", warmup_steps=10, total_steps=110)
  assert float(f(0)) == 0.0 and abs(float(f(10)) - 1e-3) < 1e-9
  assert abs(float(f(110)) - 1e-4) < 1e-9  # decays to 0.1 x the LR at --steps
  assert float(f(60)) < 1e-3 and float(f(60)) > 1e-4
  g = optimizer.lr_schedule(1e-3, "constant", warmup_steps=4)
  assert [round(float(g(i)), 6) for i in (0, 2, 4, 50)] == [0.0, 5e-4, 1e-3, 1e-3]
  assert optimizer.lr_schedule(1e-3) == 1e-3


def test_metrics_log_the_scheduled_learning_rate(shared, tmp_path):
  """metrics.jsonl's lr is what the update used, and a resume must keep the schedule."""
  _, _, text, cache = shared
  out = tmp_path / "cosine"
  args = ["--mode", "pretrain", "--layers", 1, "--d-model", 16, "--heads", 2, "--ffn", 32,
          "--max-positions", 32, "--train-text", text, "--out", out, "--steps", 6,
          "--seq-len", 16, "--batch-size", 2, "--lr", 1e-3, "--lr-schedule", "cosine",
          "--warmup-steps", 2, "--save-every", 3]
  ts.run_train(args, cache_dir=cache)
  f = optimizer.lr_schedule(1e-3, "cosine", warmup_steps=2, total_steps=6)
  got = [r["lr"] for r in ts.read_metrics(out)]
  assert got == pytest.approx([float(f(s)) for s in range(6)], rel=1e-6, abs=1e-12)
  proc = ts.run_train(args, cache_dir=cache, check=False)
  assert proc.returncode == 0 and "already complete" in proc.stderr, proc.stderr[-2000:]
  changed = [a if a != "cosine" else "constant" for a in args]
  proc = ts.run_train(changed, cache_dir=cache, check=False)
  assert proc.returncode == 2 and "lr_schedule" in proc.stderr, proc.stderr[-2000:]
