"""Linear-attention benchmark (issue 5): lcjax's chunked Pallas kernel beside flash-linear-attention.

  PYTHONPATH=. python3 -m experiments.benchmark_linear --config configs/benchmark_linear.py

flash-linear-attention (`fla-core`, PyTorch + Triton) runs in a subprocess so that PyTorch and
JAX don't fight over GPU memory; it is skipped when not importable. Prints one table last.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import numpy as np

from experiments.benchmark_decode import Log, load_config, rel_err, time_fn


def head_decays(heads: int):
  """RetNet-style per-head log decays log(1 - 2^(-5 - 8 h / H)), float32 [H]."""
  return np.log(1 - 2.0 ** (-5 - 8 * np.arange(heads) / heads)).astype(np.float32)


def fla_main(cfg):
  """Times fla's chunk_simple_gla (fwd, fwd+bwd) with and without decay; prints one JSON line."""
  import torch
  import triton
  from fla.ops.simple_gla import chunk_simple_gla

  out = {}
  for t in cfg["lengths"]:
    g = torch.Generator(device="cuda").manual_seed(t)
    shape = (cfg["batch"], t, cfg["heads"], cfg["head_dim"])
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    gamma = torch.tensor(head_decays(cfg["heads"]), device="cuda")
    for name, kw in (("nodecay", {}), ("decay", {"g_gamma": gamma})):
      fwd = lambda: chunk_simple_gla(q, k, v, **kw)
      ms = triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median")
      qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
      do = torch.randn_like(v)

      def fwd_bwd():
        o, _ = chunk_simple_gla(qg, kg, vg, **kw)
        o.backward(do)
      ms_fb = triton.testing.do_bench(fwd_bwd, warmup=20, rep=200, return_mode="median",
                                      grad_to_none=[qg, kg, vg])
      out[f"{t}_{name}"] = {"fwd_ms": ms, "fwd_bwd_ms": ms_fb}
  print("FLA_JSON " + json.dumps(out), flush=True)


def run_fla(argv):
  try:
    res = subprocess.run([sys.executable, "-m", "experiments.benchmark_linear", *argv, "--fla-only"],
                         capture_output=True, text=True, timeout=300)
  except Exception as e:  # noqa: BLE001
    return {"error": repr(e)}
  for line in res.stdout.splitlines():
    if line.startswith("FLA_JSON "):
      return json.loads(line[len("FLA_JSON "):])
  return {"error": (res.stdout + res.stderr)[-800:]}


def main(argv):
  cfg = load_config(argv)
  if "--fla-only" in argv:
    return fla_main(cfg)
  fla = run_fla([a for a in argv if a != "--fla-only"]) if cfg["fla"] else {}
  print("fla:", json.dumps(fla)[:2000], flush=True)

  import jax
  import jax.numpy as jnp
  from pallas_kernels.gpu import linear

  log = Log(cfg)
  print(f"device={jax.devices()[0].device_kind} jax={jax.__version__}", flush=True)
  b, h, d = cfg["batch"], cfg["heads"], cfg["head_dim"]
  timing = dict(iters=cfg["iters"], repeats=cfg["repeats"])
  decay = jnp.asarray(head_decays(h))
  summary = []
  ref_mod = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "lcjax", "attention",
                                        "linear_reference.py"))   # jax-only; no lcjax package import
  for t in cfg["lengths"]:
    kq, kk, kv = jax.random.split(jax.random.key(t), 3)
    q, k, v = (jax.random.normal(x, (b, t, h, d), jnp.bfloat16) for x in (kq, kk, kv))
    n = min(t, cfg["check_len"])        # causal: the first n outputs only depend on the first n tokens
    for dname, dec in (("nodecay", None), ("decay", decay)):
      ref = ref_mod["linear_attention_reference"](*(x[:, :n].astype(jnp.float32) for x in (q, k, v)),
                                                  log_decay=dec)
      best = (None, float("inf"), None)
      for chunk, bv, warps, stages in cfg["sweep"]:
        name = f"c{chunk} bv{bv} w{warps} st{stages}"
        f = jax.jit(lambda q, k, v, c=chunk, bv=bv, w=warps, st=stages, dec=dec: linear.linear_attention(
            q, k, v, dec, chunk_size=c, block_v=bv, num_warps=w, num_stages=st))
        try:
          out = f(q, k, v)
          err = rel_err(out[:, :n], ref)
          ms = time_fn(f, q, k, v, **timing) * 1e3
        except Exception as e:  # noqa: BLE001
          log.add(t=t, decay=dname, impl=name, error=repr(e)[:500])
          continue
        log.add(t=t, decay=dname, impl=name, fwd_ms=ms, err=err)
        if ms < best[1]:
          best = (name, ms, (chunk, bv, warps, stages))
      del ref
      if best[0] is None:
        continue
      chunk, bv, warps, stages = best[2]
      w = jax.random.normal(jax.random.key(1), v.shape, jnp.bfloat16)
      loss = lambda q, k, v, dec=dec: jnp.sum(linear.linear_attention(
          q, k, v, dec, chunk_size=chunk, block_v=bv, num_warps=warps, num_stages=stages).astype(jnp.float32) * w)
      g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      ms_fb = time_fn(g, q, k, v, **timing) * 1e3
      peer = fla.get(f"{t}_{dname}", {})
      log.add(t=t, decay=dname, impl="best", config=best[0], fwd_ms=best[1], fwd_bwd_ms=ms_fb, fla=peer)
      summary.append((t, dname, best[0], best[1], peer.get("fwd_ms"), ms_fb, peer.get("fwd_bwd_ms")))

  # Recurrent decode step: B8, H16, D128 state, one token.
  s0 = jax.random.normal(jax.random.key(2), (8, h, d, d), jnp.float32)
  qd, kd, vd = (jax.random.normal(jax.random.key(3 + i), (8, h, d), jnp.bfloat16) for i in range(3))
  step = jax.jit(lambda s, q, k, v: linear.linear_attention_decode_step(s, q, k, v, decay))
  step_ms = time_fn(step, s0, qd, kd, vd, **timing) * 1e3
  state_bytes = 2 * s0.size * 4
  log.add(impl="decode_step", ms=step_ms, gbps=state_bytes / step_ms / 1e6)

  print("\n| T | decay | lcjax config | lcjax fwd ms | fla fwd ms | fwd ratio (fla/lcjax) | lcjax fwd+bwd ms | fla fwd+bwd ms |")
  print("|---|---|---|---|---|---|---|---|")
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  for t, dname, conf, ms, fms, fb, ffb in summary:
    ratio = "-" if fms is None else f"{fms / ms:.2f}x"
    print(f"| {t} | {dname} | {conf} | {ms:.3f} | {fmt(fms)} | {ratio} | {fb:.3f} | {fmt(ffb)} |")
  print(f"decode step B8 H{h} D{d}: {step_ms * 1e3:.1f} us, {state_bytes / step_ms / 1e6:.0f} GB/s of state read+written")


if __name__ == "__main__":
  main(sys.argv[1:])
