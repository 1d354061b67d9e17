"""Coverage of SmolLM2's attention mass (mean over rows and heads, per layer) by the grouped
top-k masks of four bin distributions at the same k: the oracle (the teacher's own mass per
bin), the bundled student's estimate (`est_probs`), the pooled-key scores alone
(softmax of q · mean key of the bin + log of its key count, no parameters) and the 50/50 mix of
the last two. The experiment behind SEAConfig.pooled_keys (RESULTS.md).

  python recipes/pooled_coverage.py [T=1024] [windows=2] [k=64] [STUDENT folder]

(default student: the bundled one; RESULTS.md's figures used the student bundled before the
pooled keys, commit 8c8dbe7, whose estimate is the spec's estimator alone.)
"""
import sys, time
import os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax, jax.numpy as jnp, numpy as np
from sea_jax import checkpoint, data, losses, bundle
from sea_jax.ops.bins import bin_bounds
from sea_jax.ops.pooled_keys import EMPTY, pooled_key_logits
from sea_jax.sea.topk import grouped_topk_mask

T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
W = int(sys.argv[2]) if len(sys.argv) > 2 else 2
kk = int(sys.argv[3]) if len(sys.argv) > 3 else 64
teacher = checkpoint.load_pretrained("smollm2-135m")
spath = (sys.argv[4] if len(sys.argv) > 4
         else bundle.student_folder())
student = checkpoint.load_pretrained(str(spath))
tok = checkpoint.model_tokenizer(str(spath))
tokens = data.protocol_tokens(tok, "sea")
wins = data.eval_windows(tokens, T + 1)[:W]
K = student.config.sea.K

def pooled_logits(q, k):
  """The pooled-key scores (`ops.pooled_keys`) plus log of each bin's key count: a bin's
  estimated attention mass rather than its mean key's logit (bins differ in size)."""
  P = pooled_key_logits(q, k, K)
  starts, ends = bin_bounds(q.shape[2], K)
  return jnp.where(ends > starts, P + jnp.log(jnp.maximum(ends - starts, 1)), EMPTY)


def cover(mass, probs):
  m = grouped_topk_mask(probs, kk)
  return jnp.sum(jnp.where(m, mass, 0.0)) / (mass.shape[1] * mass.shape[2])

@jax.jit
def diag(window):
  x = window[None, :-1]
  t_out = teacher(x, return_attn_aux=True)
  s_out = student(x, sea_k=kk, return_attn_aux=True)
  out = {}
  for i, (ta, sa) in enumerate(zip(t_out.attn_aux, s_out.attn_aux)):
    mass = losses.teacher_bin_mass(ta, K=K)
    q = ta["q"].astype(jnp.float32); k = ta["k"].astype(jnp.float32)
    pl = pooled_logits(q, k)
    pp = jax.nn.softmax(pl, axis=-1)
    lp = sa["est_probs"].astype(jnp.float32)
    out[f"oracle_{i}"] = cover(mass, mass)
    out[f"learned_{i}"] = cover(mass, lp)
    out[f"pooled_{i}"] = cover(mass, pp)
    out[f"mix_{i}"] = cover(mass, 0.5 * pp + 0.5 * lp)
  return out

t0 = time.time()
res = [jax.device_get(diag(jnp.asarray(w))) for w in wins]
agg = {n: float(np.mean([r[n] for r in res])) for n in res[0]}
L = len([n for n in agg if n.startswith("oracle_")])
for kind in ["oracle", "learned", "pooled", "mix"]:
  print(kind, round(np.mean([agg[f"{kind}_{i}"] for i in range(L)]), 4),
        " ".join(f"{agg[f'{kind}_{i}']:.2f}" for i in range(L)))
print("secs", time.time() - t0)
