"""Decode-kernel benchmark (issue 5): lcjax's split-KV kernels (Triton; int8 / int4 also Mosaic
GPU) beside cuDNN, XLA and JAX's Pallas decode.

  PYTHONPATH=. python3 -m experiments.benchmark_decode --config configs/benchmark_decode.py \
      [--config.lengths=32768,131072] [--config.iters=30]

Needs only jax, numpy and lcjax's attention / cache modules (runs on the GPU machine without
lcjax's other dependencies). Prints one table: time per call, GB/s of cache bytes read once,
ratios against cuDNN measured in the same run.
Writes a JSONL record per measurement under $OUT (or config.log_dir).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import runpy
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.cache.base import tree_bytes
from lcjax.cache.dense import DenseKVCache
from lcjax.cache.kivi_kernel import KIVIKernelCache
from lcjax.cache.landmark import LandmarkKVCache
from lcjax.cache.quest import QuestKVCache
from pallas_kernels.gpu import decode, decode_quant, decode_quant_mgpu


def load_config(argv):
  """--config FILE plus --config.key=value overrides (values parsed as Python literals)."""
  path, overrides = None, {}
  for i, arg in enumerate(argv):
    if arg == "--config":
      path = argv[i + 1]
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      key, _, value = arg[len("--config."):].partition("=")
      try:
        overrides[key] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        overrides[key] = value
  if path is None:
    raise ValueError("--config FILE is required")
  cfg = dict(runpy.run_path(path)["get_config"]())
  for key, value in overrides.items():
    if key not in cfg:
      raise ValueError(f"unknown config key {key!r}; known: {sorted(cfg)}")
    cfg[key] = value
  return cfg


def time_fn(fn, *args, iters=30, repeats=5):
  """Median over `repeats` of the mean time of `iters` back-to-back calls (seconds)."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters)
  return float(np.median(times))


def filled_kivi_cache(k, v, *, bits, group, value_group, residual):
  """A KIVIKernelCache holding all of k, v [B, n, Hkv, D] (as if written token by token): every
  token quantised in the store, the last ring-size tokens also in the full-precision ring."""
  b, n, hkv, d = k.shape
  cache = KIVIKernelCache.create(b, n, hkv, d, bits=bits, group_size=group, value_group=value_group,
                                 residual=residual, dtype=k.dtype)
  f = cache.k_fp.shape[1]
  pos = jnp.arange(n - f, n)
  ring = lambda x: jnp.zeros_like(cache.k_fp).at[:, pos % f].set(x[:, pos])
  return dataclasses.replace(
      cache, store=decode_quant.quantize_kv(k, v, bits=bits, key_group=group, value_group=value_group),
      k_fp=ring(k), v_fp=ring(v), lengths=jnp.full((b,), n, jnp.int32))


RETRIEVAL_CACHES = {"quest": QuestKVCache, "landmark": LandmarkKVCache}


def filled_retrieval_cache(policy, k, v, *, block_size, fraction, select_per, local_blocks=1):
  """A Quest / landmark cache holding all of k, v [B, n, Hkv, D] (one prefill write), whose decode
  steps read `fraction` of the blocks: top_blocks + local_blocks = round(fraction * n / block_size).
  Returns (cache, blocks read per selecting head)."""
  b, n, hkv, d = k.shape
  selected = max(local_blocks + 1, round(fraction * n / block_size))
  cache = RETRIEVAL_CACHES[policy].create(b, n, hkv, d, block_size=block_size, top_blocks=selected - local_blocks,
                                          local_blocks=local_blocks, select_per=select_per,
                                          dtype=k.dtype)
  return jax.jit(lambda c, k, v: c.update(k, v))(cache, k, v), selected


def time_in_scan(fn, q, *rest, iters=30, repeats=5):
  """Like time_fn, but the `iters` calls run inside one jit (an unrolled lax.scan, as a compiled
  decode loop runs), so host dispatch is not timed. Each step gets its own (slightly scaled) q,
  and the carry depends on every output, so no call can be hoisted or dropped. Unrolled because
  a rolled loop cost 16.5 us per iteration of its own on the H200 (BENCHMARKS.md run 8), which
  would be charged to every kernel."""
  def many(q, *rest):
    def step(c, i):
      qi = (q.astype(jnp.float32) * (1 + 1e-3 * i.astype(jnp.float32))).astype(q.dtype)
      out = fn(qi, *rest)
      return c + jax.tree.leaves(out)[0].ravel()[0].astype(jnp.float32), None
    return jax.lax.scan(step, jnp.float32(0), jnp.arange(iters), unroll=True)[0]
  many = jax.jit(many)
  jax.block_until_ready(many(q, *rest))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(many(q, *rest))
    times.append((time.perf_counter() - t0) / iters)
  return float(np.median(times))


def checked_time(log, n, name, f, args, ref, timing):
  """(seconds per call in the scan, relative error against ref) of f(*args), or None after
  logging the row's error (a config the kernel refuses, no GPU)."""
  try:
    err = rel_err(f(*args), ref)
    return time_in_scan(f, *args, **timing), err
  except Exception as e:  # noqa: BLE001  (report and go on)
    log.add(n=n, impl=name, error=repr(e)[:500])
    return None


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


class Log:
  def __init__(self, cfg):
    d = cfg.get("log_dir") or os.environ.get("OUT") or "/tmp"
    os.makedirs(d, exist_ok=True)
    self.path = os.path.join(d, "benchmark.jsonl")
    self.rows = []

  def add(self, **rec):
    self.rows.append(rec)
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def profile(cfg):
  """One call of the dense kernel and of the int8 / int4 kernels on both dot paths (run under ncu)."""
  b, hq, hkv, d = cfg["batch"], cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"]
  n = cfg["lengths"][0] if isinstance(cfg["lengths"], (tuple, list)) else cfg["lengths"]
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (b, 1, hq, d), jnp.bfloat16)
  k = jax.random.normal(kk, (b, n, hkv, d), jnp.bfloat16)
  v = jax.random.normal(kv, (b, n, hkv, d), jnp.bfloat16)
  lengths = jnp.full((b,), n, jnp.int32)
  bk, splits, warps, stages = cfg["profile_config"]
  opts = dict(block_k=bk, num_splits=splits, num_warps=warps, num_stages=stages)
  jax.block_until_ready(decode.decode_attention(q, k, v, lengths, **opts))
  for bits in (8, 4):
    vg = max(g for g in cfg["value_groups"] if decode_quant.value_group_fits(d, bits, g))
    qkv = decode_quant.quantize_kv(k, v, bits=bits, key_group=cfg["key_group"], value_group=vg)
    for int8_mma in (False, True):
      jax.block_until_ready(decode_quant.quantized_decode_attention(q, qkv, lengths, int8_mma=int8_mma, **opts))


def fixed_cost(q, k, v, t_empty, log, timing):
  """Fixed cost (launch + merge): the dense kernel over a 128-token cache, in a scan and from Python."""
  b = q.shape[0]
  k0, v0, lengths = k[:, :128], v[:, :128], jnp.full((b,), 128, jnp.int32)
  f = jax.jit(lambda q, k, v, l: decode.decode_attention(q, k, v, l))
  t0 = time_in_scan(f, q, k0, v0, lengths, **timing)
  t1 = time_fn(f, q, k0, v0, lengths, **timing)
  # cuDNN's own fixed cost at the same size; the part of t0 that is the kernel's is t0 - t_empty.
  cudnn = jax.jit(lambda q, k, v, l: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
  try:
    t_cudnn = time_in_scan(cudnn, q, k0, v0, lengths, **timing)
  except Exception:  # noqa: BLE001  (no cuDNN: report the rest)
    t_cudnn = float("nan")
  log.add(impl="fixed cost (128 keys)", ms_in_scan=t0 * 1e3, ms_host_loop=t1 * 1e3,
          ms_empty_scan_step=t_empty * 1e3, ms_cudnn_in_scan=t_cudnn * 1e3)
  print(f"fixed cost of one decode call over 128 keys: {t0 * 1e6:.1f} us in a scan "
        f"(an empty scan step {t_empty * 1e6:.1f} us, cuDNN {t_cudnn * 1e6:.1f} us), "
        f"{t1 * 1e6:.1f} us dispatched from Python", flush=True)


def main(argv):
  cfg = load_config(argv)
  if cfg["mode"] == "profile":
    return profile(cfg)
  log = Log(cfg)
  b, hq, hkv, d = cfg["batch"], cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"]
  lengths_list = cfg["lengths"] if isinstance(cfg["lengths"], (tuple, list)) else (cfg["lengths"],)
  timing = dict(iters=cfg["iters"], repeats=cfg["repeats"])
  print(f"device={jax.devices()[0].device_kind} jax={jax.__version__}", flush=True)
  summary = []
  # What a timed step costs with no attention at all (the step's own ops and carry; XLA may scale
  # only the element the carry reads): charged to every kernel alike, so the sparse rows also
  # report their ratio net of it.
  q0 = jnp.ones((b, 1, hq, d), jnp.bfloat16)
  t_empty = time_in_scan(jax.jit(lambda q: q), q0, **timing)
  log.add(impl="empty scan step", ms=t_empty * 1e3)
  for n in lengths_list:
    key = jax.random.key(n)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, 1, hq, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, n, hkv, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, n, hkv, d), jnp.bfloat16)
    lengths = jnp.full((b,), n, jnp.int32)
    kv_bytes = 2 * b * n * hkv * d * 2
    gbps = lambda t: kv_bytes / t / 1e9
    results = {}

    # Baselines. XLA and JAX's Pallas decode transpose K/V on every call; inside a scan over a
    # constant cache XLA hoists that copy out of the loop, so they are timed from Python instead
    # (a real decode step's cache changes every step: the copy cannot be hoisted there).
    ref = None
    if "cudnn" in cfg["baselines"]:
      f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
      try:
        ref = f(q, k, v)
        results["cudnn"] = time_in_scan(f, q, k, v, **timing)
      except Exception as e:  # noqa: BLE001  (report and go on)
        log.add(n=n, impl="cudnn", error=repr(e)[:300])
    if "xla" in cfg["baselines"]:
      f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
      out = f(q, k, v)
      ref = out if ref is None else ref
      results["xla"] = time_fn(f, q, k, v, **timing)
    if "jax_pallas" in cfg["baselines"]:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
      f = jax.jit(lambda q, k, v, l: jax_decode.gqa(q[:, 0], k, v, kv_seq_len=l))
      try:
        out = f(q, k, v, lengths)
        log.add(n=n, impl="jax_pallas", err=rel_err(out, ref[:, 0]))
        results["jax_pallas"] = time_fn(f, q, k, v, lengths, **timing)
      except Exception as e:  # noqa: BLE001
        log.add(n=n, impl="jax_pallas", error=repr(e)[:300])
    for impl, t in results.items():
      log.add(n=n, impl=impl, ms=t * 1e3, gbps=gbps(t))

    # lcjax dense: sweep tile / split / warps / stages.
    best = (None, float("inf"))
    for bk, splits, warps, stages in cfg["dense_sweep"]:
      f = jax.jit(lambda q, k, v, l, bk=bk, s=splits, w=warps, st=stages: decode.decode_attention(
          q, k, v, l, block_k=bk, num_splits=s, num_warps=w, num_stages=st))
      name = f"lcjax bk{bk} s{splits} w{warps} st{stages}"
      if (timed := checked_time(log, n, name, f, (q, k, v, lengths), ref, timing)) is None:
        continue
      t, err = timed
      log.add(n=n, impl=name, ms=t * 1e3, gbps=gbps(t), err=err)
      if t < best[1]:
        best = (name, t)
    results["lcjax_dense"] = best[1]
    summary.append((n, "dense bf16", best[0], best[1], gbps(best[1]), results.get("cudnn")))

    # Ragged batch: one sequence at n, the others at n * fraction. The even split gives the long
    # sequence's programs all its keys; the balanced schedule cuts the batch's tiles evenly.
    # "x ideal": against the full batch's best time scaled by the tokens actually held.
    for frac in cfg["ragged_fractions"]:
      rl = jnp.array([n] + [max(1, int(n * frac))] * (b - 1), jnp.int32)
      ideal = best[1] * float(rl.sum()) / (b * n)
      rref = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                          key_value_seq_lengths=rl, implementation="xla")
      bk, splits, warps, stages = cfg["ragged_config"]
      rows = [(f"ragged {frac:g} cudnn", jax.jit(lambda q, k, v, l: jax.nn.dot_product_attention(
          q, k, v, key_value_seq_lengths=l, implementation="cudnn")))]
      rows += [(f"ragged {frac:g} lcjax {sched} bk{bk} s{splits}", jax.jit(
          lambda q, k, v, l, sched=sched: decode.decode_attention(q, k, v, l, block_k=bk, num_splits=splits,
                                                                  num_warps=warps, num_stages=stages,
                                                                  schedule=sched)))
               for sched in decode.SCHEDULES]
      for name, f in rows:
        if (timed := checked_time(log, n, name, f, (q, k, v, rl), rref, timing)) is not None:
          log.add(n=n, impl=name, ms=timed[0] * 1e3, err=timed[1], x_ideal=timed[0] / ideal)
    for impl in ("cudnn", "xla", "jax_pallas"):
      if impl in results:
        summary.append((n, impl, "", results[impl], gbps(results[impl]), results.get("cudnn")))

    # Quantised caches: tokens/s relative to cuDNN's bf16 (same tokens, fewer bytes).
    for bits in (8, 4):
     for vg in cfg["value_groups"]:
      if not decode_quant.value_group_fits(d, bits, vg):
        continue
      qkv = jax.jit(lambda k, v, bits=bits, vg=vg: decode_quant.quantize_kv(
          k, v, bits=bits, key_group=cfg["key_group"], value_group=vg))(k, v)
      qbytes = sum(x.size * x.dtype.itemsize for x in qkv)
      # float32 reference on the same dequantised cache (a bf16 XLA reference at these lengths
      # has errors of the kernels' own size: runs 8-10 reported those).
      kd, vd = decode_quant.dequantize_kv(qkv, jnp.float32)
      qref = jax.nn.dot_product_attention(q.astype(jnp.float32), kd, vd, implementation="xla")
      del kd, vd
      qbest = (None, float("inf"))
      sweep = [(f"int{bits} vg{vg} bk{bk} s{splits} w{warps} st{stages}{' int8mma' if i8 else ''}",
                jax.jit(lambda q, c, l, bk=bk, s=splits, w=warps, st=stages, i8=i8:
                        decode_quant.quantized_decode_attention(q, c, l, block_k=bk, num_splits=s,
                                                                num_warps=w, num_stages=st, int8_mma=i8)))
               for bk, splits, warps, stages, i8 in cfg["quant_sweep"]]
      sweep += [(f"int{bits} vg{vg} mosaic bk{bk} s{splits} st{stages}",
                 jax.jit(lambda q, c, l, bk=bk, s=splits, st=stages: decode_quant_mgpu.quantized_decode_attention(
                     q, c, l, block_k=bk, num_splits=s, stages=st)))
                for sweep_bits, bk, splits, stages in cfg["mosaic_sweep"]
                if sweep_bits == bits and decode_quant_mgpu.config_reason(q.shape, qkv, bk) is None]
      for name, f in sweep:
        if (timed := checked_time(log, n, name, f, (q, qkv, lengths), qref, timing)) is None:
          continue
        t, err = timed
        log.add(n=n, impl=name, ms=t * 1e3, gbps=qbytes / t / 1e9, err=err, bytes=qbytes)
        if t < qbest[1]:
          qbest = (name, t)
      summary.append((n, f"int{bits}", qbest[0], qbest[1], qbytes / qbest[1] / 1e9, results.get("cudnn")))
      del qkv

    # Through the caches' API (what generate's decode step runs): DenseKVCache and KIVIKernelCache.
    for bits, vg in cfg["kivi_caches"]:
      cache = filled_kivi_cache(k, v, bits=bits, group=cfg["key_group"], value_group=vg,
                                residual=cfg["kivi_residual"])
      name = f"KIVIKernelCache int{bits} vg{vg} residual {cfg['kivi_residual']}"
      f = jax.jit(lambda q, c: c.attend(q))
      err = rel_err(f(q, cache), cache.attend(q.astype(jnp.float32), implementation="xla"))
      t = time_in_scan(f, q, cache, **timing)
      log.add(n=n, impl=name, ms=t * 1e3, err=err)
      summary.append((n, "cache API", name, t, tree_bytes(cache) / t / 1e9, results.get("cudnn")))
      del cache
    if cfg["kivi_caches"] or cfg["retrieval_caches"]:
      dense = DenseKVCache(k, v, lengths)
      t_dense = time_in_scan(jax.jit(lambda q, c: c.attend(q)), q, dense, **timing)
      log.add(n=n, impl="DenseKVCache", ms=t_dense * 1e3)
      summary.append((n, "cache API", "DenseKVCache", t_dense, gbps(t_dense), results.get("cudnn")))
      del dense
    # Quest / landmark: the step scores the block summaries, then the block-sparse kernel reads the
    # selected blocks, one list per KV head (select_per="kv_head") or per query head (a KV block
    # is then read once per query head choosing it).
    for policy, block_size, frac, select_per in cfg["retrieval_caches"]:
      cache, selected = filled_retrieval_cache(policy, k, v, block_size=block_size, fraction=frac,
                                               select_per=select_per)
      f = jax.jit(lambda q, c: c.attend(q))
      f32 = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, cache)
      err = rel_err(f(q, cache), f32.attend(q.astype(jnp.float32), implementation="xla"))
      del f32
      t = time_in_scan(f, q, cache, **timing)
      # The selection alone (scores, top-k, block lists), to split the step's time.
      t_select = time_in_scan(jax.jit(lambda q, c: (lambda lay: lay.kv_indices.sum() + lay.kv_counts.sum())(
          c.decode_layout(q))), q, cache, **timing)
      frac_read = selected * block_size / n
      name = (f"{type(cache).__name__} per {select_per}, block {block_size}, {selected} of "
              f"{n // block_size} blocks")
      log.add(n=n, impl=name, ms=t * 1e3, err=err, ideal_ms=frac_read * t_dense * 1e3,
              select_ms=t_select * 1e3)
      summary.append((n, "cache API", f"{name}; {t / (frac_read * t_dense):.2f}x frac*DenseKVCache, "
                      f"selection {t_select * 1e6:.1f} us", t,
                      frac_read * kv_bytes / t / 1e9, results.get("cudnn")))
      del cache

    # Block-sparse: random selected key blocks per (batch, kv head).
    nb = n // cfg["sparse_block"]
    rng = np.random.default_rng(0)
    for frac in cfg["sparse_fractions"]:
      count = max(1, int(round(frac * nb)))
      idx = np.sort(np.stack([rng.permutation(nb)[:count] for _ in range(b * hkv)]), -1)
      idx = jnp.asarray(idx.reshape(b, hkv, count), jnp.int32)
      cnt = jnp.full((b, hkv), count, jnp.int32)
      sbest = (None, float("inf"))
      for bk, splits, warps, stages in cfg["sparse_sweep"]:
        f = jax.jit(lambda q, k, v, l, i, c, bk=bk, s=splits, w=warps, st=stages: decode.decode_attention(
            q, k, v, l, i, c, block_size=cfg["sparse_block"], block_k=bk, num_splits=s, num_warps=w,
            num_stages=st))
        name = f"sparse {frac} bk{bk} s{splits} w{warps} st{stages}"
        try:
          t = time_in_scan(f, q, k, v, lengths, idx, cnt, **timing)
        except Exception as e:  # noqa: BLE001
          log.add(n=n, impl=name, error=repr(e)[:500])
          continue
        log.add(n=n, impl=name, ms=t * 1e3, ideal_ms=frac * results["lcjax_dense"] * 1e3)
        if t < sbest[1]:
          sbest = (name[len(f"sparse {frac} "):], t)
      t = sbest[1]
      ideal = frac * results["lcjax_dense"]
      net = (t - t_empty) / (frac * (results["lcjax_dense"] - t_empty))
      summary.append((n, f"sparse {frac:.3f}", f"{sbest[0]}; {t / ideal:.2f}x frac*dense, "
                      f"{net:.2f}x net of the empty step", t,
                      frac * kv_bytes / t / 1e9, results.get("cudnn")))

  if jax.default_backend() == "gpu":
    fixed_cost(q, k, v, t_empty, log, timing)
  else:
    print("fixed cost not measured: the decode kernel runs on a GPU only", flush=True)

  print("\n| KV len | kernel | config | ms | GB/s (bytes read) | tokens/s vs cuDNN bf16 |")
  print("|---|---|---|---|---|---|")
  for n, kind, conf, t, bw, t_cudnn in summary:
    ratio = f"{t_cudnn / t:.2f}x" if t_cudnn else "-"
    print(f"| {n} | {kind} | {conf} | {t * 1e3:.3f} | {bw:.0f} | {ratio} |")


if __name__ == "__main__":
  main(sys.argv[1:])
