"""Prefill/training attention benchmark (issue 4): lcjax's Pallas kernels beside cuDNN, XLA and
JAX's own Pallas kernels, in one run, on one GPU.

  PYTHONPATH=. python3 -m experiments.benchmark_prefill --config configs/benchmark_prefill.py

Prints a table (shape, kernel, ms, TFLOP/s, ratio to cuDNN) and writes JSON lines with --out.
FLOPs: 4*T*T*D*H forward (halved for causal), forward+backward 3.5x forward; block-sparse rows
count the visited blocks' FLOPs (density x full). Needs only jax and numpy (argparse, no absl).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import BlockLayout, attention_reference, masks
from lcjax.attention.pallas_backend import attend_pallas


def load_config(path: str, overrides: list[str]):
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = dict(module.get_config())
  for item in overrides:            # --set key=python_literal
    key, value = item.split("=", 1)
    if key not in config:
      raise ValueError(f"--set {key}: unknown key; accepted: {sorted(config)}")
    config[key] = eval(value, {})   # pylint: disable=eval-used
  return config


def bench(fn, args, samples: int, calls: int) -> float:
  """Median milliseconds per call; each sample dispatches `calls` calls and waits once."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls * 1e3)
  return statistics.median(times)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def forward_fns(config, causal: bool, seq: int):
  """name -> f(q, k, v) -> out, for every kernel the config names."""
  scale = config["head_dim"] ** -0.5
  mask = masks.causal() if causal else None
  fns = {}
  for kernel in config["lcjax_kernels"]:
    fns[f"lcjax[{kernel}]"] = jax.jit(
        lambda q, k, v, kernel=kernel: attend_pallas(q, k, v, mask=mask, scale=scale,
                                                     kernel=kernel))
  if "cudnn" in config["baselines"]:
    fns["cudnn"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="cudnn"))
  if "xla" in config["baselines"] and seq <= config["xla_max_seq"]:
    fns["xla"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="xla"))
  if "jax_triton" in config["baselines"]:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from jax.experimental.pallas.ops.gpu import attention as jax_triton
    fns["jax_triton"] = jax.jit(lambda q, k, v: jax_triton.mha(q, k, v, None, sm_scale=scale,
                                                               causal=causal))
  if "jax_mgpu" in config["baselines"]:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as jax_mgpu
    tuning = jax_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
    fns["jax_mgpu"] = jax.jit(lambda q, k, v: jax_mgpu.attention(q, k, v, tuning))
  return fns


def random_inputs(config, seq: int, seed: int):
  dtype = jnp.dtype(config["dtype"])
  keys = jax.random.split(jax.random.key(seed), 4)
  b, h, hk, d = config["batch"], config["heads"], config["kv_heads"], config["head_dim"]
  q = jax.random.normal(keys[0], (b, seq, h, d), dtype)
  k = jax.random.normal(keys[1], (b, seq, hk, d), dtype)
  v = jax.random.normal(keys[2], (b, seq, hk, d), dtype)
  do = jax.random.normal(keys[3], (b, seq, h, d), dtype)
  return q, k, v, do


def vjp_fn(fwd):
  def run(q, k, v, do):
    out, pull = jax.vjp(fwd, q, k, v)
    return out, *pull(do)
  return jax.jit(run)


def seq_name(seq: int) -> str:
  return f"{seq // 1024}k" if seq % 1024 == 0 else str(seq)


def attention_flops(config, seq: int, causal: bool) -> float:
  flops = 4.0 * seq * seq * config["head_dim"] * config["heads"] * config["batch"]
  return flops / 2 if causal else flops


def random_block_layout(seq: int, heads: int, density: float, seed: int) -> BlockLayout:
  """Random 128x128 block table per head plus the diagonal, every visited block fully visible."""
  n = seq // 128
  rng = np.random.default_rng(seed)
  visible = rng.random((1, heads, n, n)) < density
  visible |= np.eye(n, dtype=bool)[None, None]
  return BlockLayout.from_block_mask(visible, visible, block_q=128, block_kv=128, q_len=seq,
                                     kv_len=seq)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/benchmark_prefill.py")
  parser.add_argument("--set", action="append", default=[], help="key=python_literal override")
  parser.add_argument("--out", default=None, help="JSON-lines file for the rows")
  args = parser.parse_args(argv)
  config = load_config(args.config, args.set)
  samples, calls = config["samples"], config["calls_per_sample"]
  rows = []
  out_file = open(args.out, "w") if args.out else None

  def record(shape, kernel, ms, flops, baseline_ms=None, note=""):
    row = dict(shape=shape, kernel=kernel, ms=ms, tflops=flops / ms / 1e9,
               ratio_to_cudnn=(baseline_ms / ms) if baseline_ms else None, note=note)
    rows.append(row)
    print(f"  {shape:<34} {kernel:<18} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s"
          + (f"  x{row['ratio_to_cudnn']:.3f} cuDNN" if baseline_ms else "") + f"  {note}", flush=True)
    if out_file:
      out_file.write(json.dumps(row) + "\n")
      out_file.flush()

  print(f"device={jax.devices()[0].device_kind} jax={jax.__version__} config={config}", flush=True)

  # 1. Correctness at a real size against the XLA reference (outputs) and cuDNN (gradients).
  if config.get("check_seq"):
    seq = config["check_seq"]
    q, k, v, do = random_inputs(config, seq, 0)
    for causal in (True, False):
      mask = masks.causal() if causal else None
      ref = attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                mask=mask)
      for kernel in config["lcjax_kernels"]:
        try:
          out = attend_pallas(q, k, v, mask=mask, kernel=kernel)
          print(f"check T={seq} causal={causal} lcjax[{kernel}] fwd rel err {rel_err(out, ref):.2e}",
                flush=True)
        except Exception as e:  # pylint: disable=broad-except
          print(f"check lcjax[{kernel}] failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    ref_vjp = vjp_fn(lambda q, k, v: attention_reference(q, k, v, mask=masks.causal()))
    want = ref_vjp(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                   do.astype(jnp.float32))
    got = vjp_fn(lambda q, k, v: attend_pallas(q, k, v, mask=masks.causal()))(q, k, v, do)
    print("check causal fwd+bwd rel err (out, dq, dk, dv): "
          + ", ".join(f"{rel_err(a, b):.2e}" for a, b in zip(got, want)), flush=True)
    layout = random_block_layout(seq, config["heads"], 0.1, 1)
    ref = attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                              layout=layout)
    out = attend_pallas(q, k, v, layout=layout)
    print(f"check block-sparse 10% fwd rel err {rel_err(out, ref):.2e}", flush=True)
    del ref, want, got

  # 2. Dense forward.
  dense_ms = {}
  for seq, causal in config["dense_fwd"]:
    q, k, v, _ = random_inputs(config, seq, 1)
    flops = attention_flops(config, seq, causal)
    shape = f"fwd T={seq_name(seq)} {'causal' if causal else 'full'}"
    fns = forward_fns(config, causal, seq)
    times = {}
    for name, fn in fns.items():
      try:
        times[name] = bench(fn, (q, k, v), samples, calls)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {shape} {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    base = times.get("cudnn")
    for name, ms in times.items():
      record(shape, name, ms, flops, base)
    dense_ms[(seq, causal)] = times

  # 3. Dense forward + backward, causal.
  for seq in config["dense_fwdbwd"]:
    q, k, v, do = random_inputs(config, seq, 2)
    flops = 3.5 * attention_flops(config, seq, True)
    shape = f"fwd+bwd T={seq_name(seq)} causal"
    times = {}
    for name, fwd in forward_fns(config, True, seq).items():
      if name == "jax_mgpu":       # its backward does not support causal masking
        continue
      try:
        times[name] = bench(vjp_fn(fwd), (q, k, v, do), samples, calls)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {shape} {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    base = times.get("cudnn")
    for name, ms in times.items():
      record(shape, name, ms, flops, base)

  # 4. Block-sparse forward (and backward) on random block tables plus the diagonal.
  seq = config["sparse_seq"]
  q, k, v, do = random_inputs(config, seq, 3)
  full_flops = attention_flops(config, seq, False)
  dense = {}
  for kernel in config["lcjax_kernels"]:
    fn = jax.jit(lambda q, k, v, kernel=kernel: attend_pallas(q, k, v, kernel=kernel))
    dense[kernel] = dense_ms.get((seq, False), {}).get(f"lcjax[{kernel}]") or bench(fn, (q, k, v), samples, calls)
    if config["sparse_backward"]:
      dense[kernel, "bwd"] = bench(vjp_fn(lambda q, k, v, kernel=kernel: attend_pallas(
          q, k, v, kernel=kernel)), (q, k, v, do), samples, calls)
  for density in config["sparse_densities"]:
    layout = random_block_layout(seq, config["heads"], density, 4)
    real = float(np.asarray(layout.density()).mean())
    flops = full_flops * real
    for kernel in config["lcjax_kernels"]:
      fn = jax.jit(lambda q, k, v, kernel=kernel, layout=layout: attend_pallas(
          q, k, v, layout=layout, kernel=kernel))
      ms = bench(fn, (q, k, v), samples, calls)
      bound = 1.25 * real * dense[kernel]
      record(f"sparse fwd T={seq_name(seq)} d={real:.3f}", f"lcjax[{kernel}]", ms, flops,
             note=f"target <= {bound:.3f} ms (1.25 x density x dense {dense[kernel]:.3f}): "
                  f"{'met' if ms <= bound else 'MISSED'}")
      if config["sparse_backward"]:
        ms = bench(vjp_fn(lambda q, k, v, kernel=kernel, layout=layout: attend_pallas(
            q, k, v, layout=layout, kernel=kernel)), (q, k, v, do), samples, calls)
        bound = 1.5 * 1.25 * real * dense[kernel, "bwd"]
        record(f"sparse fwd+bwd T={seq_name(seq)} d={real:.3f}", f"lcjax[{kernel}]", ms, 3.5 * flops,
               note=f"target <= {bound:.3f} ms (1.5 x 1.25 x density x dense fwd+bwd "
                    f"{dense[kernel, 'bwd']:.3f}): {'met' if ms <= bound else 'MISSED'}")

  print("\n| shape | kernel | ms | TFLOP/s | x cuDNN | note |\n|---|---|---|---|---|---|")
  for r in rows:
    ratio = f"{r['ratio_to_cudnn']:.3f}" if r["ratio_to_cudnn"] else "-"
    print(f"| {r['shape']} | {r['kernel']} | {r['ms']:.3f} | {r['tflops']:.1f} | {ratio} | {r['note']} |")
  if out_file:
    out_file.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
