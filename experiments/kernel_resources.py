"""Registers, shared memory and programs per SM of the Mosaic GPU quantised decode kernel, without a GPU.

Compiles pallas_kernels.gpu.decode_quant_mgpu for an H100 (sm_90a; the H200 has the same SM)
through XLA's deviceless compile (a compile-only CUDA topology) and reads what ptxas and Mosaic
GPU report: registers per thread, spills, and the kernel's dynamic shared memory. From those it
works out how many programs (one warpgroup each) fit on an SM. The decode kernels are
latency-bound when few programs share an SM (BENCHMARKS.md run 14), so this is the number to
watch when changing the kernel, and it needs no device time.

Needs the CUDA plugin of the pinned JAX, which the CPU environment does not carry; in its own
environment (about 3 GB of CUDA wheels; no GPU or driver needed):

  python3.12 -m venv /tmp/cudavenv && /tmp/cudavenv/bin/pip install "jax[cuda13]==0.11.2" numpy
  PYTHONPATH=. /tmp/cudavenv/bin/python -m experiments.kernel_resources --config configs/benchmark_decode.py

One row per `mosaic_sweep` entry of the decode benchmark's config (and per value group), at the
config's first length.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tempfile

if __name__ == "__main__":      # before JAX starts: no GPU, no driver, ptxas and Mosaic reports on
  os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
  os.environ["MOSAIC_GPU_DUMP_RESOURCES"] = "1"

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu.utils import MBARRIER_BYTES

from pallas_kernels.gpu.decode import NUM_SMS


@dataclasses.dataclass(frozen=True)
class SMLimits:
  """Per-SM limits of a Hopper GPU (H100 / H200, compute capability 9.0)."""
  registers: int = 65536            # 4 sub-partitions of 16384
  sub_partitions: int = 4
  register_unit: int = 256          # registers are given to a warp in units of 256
  smem_bytes: int = 233472          # 228 KiB shared memory per SM
  smem_reserved_per_block: int = 1024
  max_threads: int = 2048
  max_blocks: int = 32


def programs_per_sm(registers: int, smem_bytes: int, threads: int = 128, limits: SMLimits = SMLimits()):
  """How many programs of `threads` threads, each thread using `registers` registers and each
  program `smem_bytes` of dynamic shared memory, one SM holds: (by registers, by shared memory,
  both). A warp's registers come in units of register_unit, and a warp lives on one sub-partition."""
  warps = math.ceil(threads / 32)
  per_warp = math.ceil(registers * 32 / limits.register_unit) * limits.register_unit
  warps_per_part = (limits.registers // limits.sub_partitions) // per_warp
  by_registers = (warps_per_part * limits.sub_partitions) // warps
  by_smem = limits.smem_bytes // (smem_bytes + limits.smem_reserved_per_block)
  by_threads = min(limits.max_threads // threads, limits.max_blocks)
  return by_registers, by_smem, min(by_registers, by_smem, by_threads)


# What ptxas and Mosaic GPU print (MOSAIC_GPU_DUMP_PTXAS / MOSAIC_GPU_DUMP_RESOURCES).
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SCRATCH = re.compile(r"smem_scratch_bytes=(\d+)")
_BARRIERS = re.compile(r"num_barriers=(\d+)[^)]*\): (\d+)")


def parse_report(text: str) -> dict:
  """ptxas' and Mosaic GPU's report of one kernel -> registers, spill bytes, dynamic smem bytes
  (the scratch buffer and the barriers, as Mosaic GPU requests them at launch)."""
  registers, spills, scratch = _REGISTERS.search(text), _SPILLS.search(text), _SCRATCH.search(text)
  if not (registers and spills and scratch):
    raise ValueError("no ptxas / Mosaic GPU resource report in the compiler output (were "
                     "MOSAIC_GPU_DUMP_PTXAS and MOSAIC_GPU_DUMP_RESOURCES set before JAX started?)")
  barriers = sum(int(n) * int(count) for n, count in _BARRIERS.findall(text))
  return dict(registers=int(registers.group(1)), spill_bytes=int(spills.group(1)) + int(spills.group(2)),
              smem_bytes=int(scratch.group(1)) + barriers * MBARRIER_BYTES)


def _compile_report(fn, *args) -> str:
  """Compiles jax.jit(fn) for CUDA and returns what the compiler printed (ptxas and Mosaic GPU
  write to the process's stdout, so file descriptor 1 is captured)."""
  sys.stdout.flush()
  saved = os.dup(1)
  with tempfile.TemporaryFile(mode="w+") as out:
    os.dup2(out.fileno(), 1)
    try:
      jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compile()
    finally:
      sys.stdout.flush()
      os.dup2(saved, 1)
      os.close(saved)
    out.seek(0)
    return out.read()


# XLA's description of the target GPU for a deviceless compile (GpuTargetConfigProto, text).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 13 minor: 0 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def main(argv):
  from experiments.benchmark_decode import load_config
  from jax.experimental import topologies
  from jax.sharding import NamedSharding, PartitionSpec
  from pallas_kernels.gpu import decode_quant, decode_quant_mgpu
  cfg = load_config(argv)
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET, topology="1x1x1")
  except NotImplementedError as e:
    raise SystemExit(f"no CUDA compiler in this environment ({e}): run this with the CUDA plugin of "
                     f"JAX {jax.__version__} installed, see this module's docstring") from e
  replicated = NamedSharding(topologies.make_mesh(topology, (1,), ("x",)), PartitionSpec())
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
  b, hq, hkv, d, n = cfg["batch"], cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"], cfg["lengths"][0]
  q, lengths = spec(jax.ShapeDtypeStruct((b, 1, hq, d), jnp.bfloat16)), spec(jax.ShapeDtypeStruct((b,), jnp.int32))
  print(f"Mosaic GPU quantised decode, B{b} Hq{hq} Hkv{hkv} D{d}, {n} keys, key group {cfg['key_group']}; "
        f"sm_90a, {jax.__version__}")
  row = "{:>4} {:>7} {:>6} {:>6} {:>11} {:>9} {:>6} {:>10} {:>11} {:>9} {:>9} {:>5}".format
  print(row("bits", "block_k", "splits", "stages", "value_group", "registers", "spills", "smem bytes",
            "programs/SM", "(by regs", "by smem)", "waves"))
  for bits, block_k, splits, stages in cfg["mosaic_sweep"]:
    for value_group in cfg["value_groups"]:
      kv = jax.eval_shape(lambda: decode_quant.quantize_kv(jnp.zeros((b, n, hkv, d)), jnp.zeros((b, n, hkv, d)), bits=bits,
                                                           key_group=cfg["key_group"], value_group=value_group))
      if (reason := decode_quant_mgpu.config_reason(q.shape, kv, block_k)) is not None:
        print(row(bits, block_k, splits, stages, value_group, "-", "-", "-", "-", "-", "-", "-"), "not taken:", reason)
        continue
      call = lambda q, kv, lengths: decode_quant_mgpu.quantized_decode_attention(
          q, kv, lengths, block_k=block_k, num_splits=splits, stages=stages)
      report = parse_report(_compile_report(call, q, jax.tree.map(spec, kv), lengths))
      by_regs, by_smem, per_sm = programs_per_sm(report["registers"], report["smem_bytes"])
      waves = b * hkv * splits / (per_sm * NUM_SMS)
      print(row(bits, block_k, splits, stages, value_group, report["registers"], report["spill_bytes"],
                report["smem_bytes"], per_sm, by_regs, by_smem, f"{waves:.2f}"))


if __name__ == "__main__":
  main(sys.argv[1:])
