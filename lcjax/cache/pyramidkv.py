"""PyramidKV: SnapKV's scoring with budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv:2406.02069). Lower layers attend broadly and get more tokens, upper layers attend to a few
and get fewer; the total over layers equals num_layers * average budget. The per-layer cache is
an EvictingKVCache with SnapKVPolicy and the budget from `pyramid_budgets`.
"""

from __future__ import annotations

from lcjax.cache.snapkv import SnapKVPolicy

PyramidKVPolicy = SnapKVPolicy


def pyramid_budgets(average: int, num_layers: int, *, beta: float = 20.0, minimum: int = 1) -> tuple[int, ...]:
  """Arithmetic budget schedule of the paper: top layer k_{L-1} = total / (beta * L),
  bottom layer k_0 = 2 * total / L - k_{L-1}, linear in between (total = average * L).

  Args:
    average: mean budget per layer (tokens per head).
    num_layers: L.
    beta: the paper's steepness (larger: flatter top, steeper pyramid); must be >= 1.
    minimum: floor on every budget (e.g. SnapKV's observation window).
  Returns:
    tuple of L ints (rounded down, at least `minimum`).
  """
  if average < 1 or num_layers < 1 or beta < 1:
    raise ValueError(f"average={average}, num_layers={num_layers}, beta={beta}: need >= 1 each")
  if num_layers == 1:
    return (max(int(average), minimum),)
  total = average * num_layers
  top = total / (beta * num_layers)
  bottom = 2 * total / num_layers - top
  return tuple(max(int(bottom - (bottom - top) * l / (num_layers - 1)), minimum) for l in range(num_layers))
