"""experiments/kernel_resources.py: the programs-per-SM arithmetic and the parsing of ptxas' and
Mosaic GPU's reports (the deviceless compile itself needs the CUDA plugin, not in CPU CI)."""
from experiments.kernel_resources import SMLimits, parse_report, programs_per_sm

# What the tool read for the int4 kernel on 256-key tiles (BENCHMARKS.md run 14: ncu showed the same
# 206 registers and 78.95 kB on the H200).
REPORT = """ptxas info    : Compiling entry function 'lcjax_int4_decode_mosaic_mosaic_gpu_kernel' for 'sm_90a'
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 206 registers, used 2 barriers, 1 bytes smem
Resources(smem_scratch_bytes=78848, tmem_scratch_cols=0, tmem_collective_scratch_cols=0, barrier_counts=Counter({Barrier(arrival_count=128, num_barriers=2, orders_tensor_core=False): 6, Barrier(arrival_count=128, num_barriers=1, orders_tensor_core=False): 1}), scoped_gmem_semaphores={})
"""


def test_parse_report_reads_registers_spills_and_launch_smem():
  assert parse_report(REPORT) == dict(registers=206, spill_bytes=0, smem_bytes=78848 + 13 * 8)
  spilled = REPORT.replace("0 bytes spill stores, 0 bytes spill loads", "24 bytes spill stores, 16 bytes spill loads")
  assert parse_report(spilled)["spill_bytes"] == 40


def test_parse_report_says_when_the_report_is_missing():
  import pytest
  with pytest.raises(ValueError, match="MOSAIC_GPU_DUMP_PTXAS"):
    parse_report("ptxas info    : Compile time = 1 ms")


def test_programs_per_sm_follows_registers_and_shared_memory():
  assert programs_per_sm(206, 78952) == (2, 2, 2)        # the int4 kernel measured by ncu: 2 per SM
  assert programs_per_sm(168, 75880) == (3, 3, 3)        # 168 registers = 21 units of 256 per warp
  assert programs_per_sm(169, 75880)[0] == 2             # 176 per thread: 2 warps per sub-partition
  assert programs_per_sm(117, 76904) == (4, 2, 2)        # 312 bytes over the third program's share
  assert programs_per_sm(32, 0) == (16, 228, 16)         # then the 2048-thread limit
  assert programs_per_sm(64, 1024, threads=256, limits=SMLimits(smem_bytes=8192)) == (4, 4, 4)
