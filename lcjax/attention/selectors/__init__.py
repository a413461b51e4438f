"""Dynamic-sparsity selectors: (q, k, ..., budget) -> BlockLayout, one method per file.

  block_topk      mean-pooled q · k block scores, top-k
  quest           Quest's per-block key min/max upper bounds (Tang et al. 2024)
  vertical_slash  MInference's vertical and slash lines (Jiang et al. 2024)
  flexprefill     FlexPrefill's per-head pattern choice, cumulative threshold (Lai et al. 2025)
  hip             HiP's hierarchical top-k tree pruning, O(T log T) (Lee et al. 2024)
  landmark        landmark-token block retrieval (Mohtashami & Jaggi 2023)
  centroid        Squeezed Attention's k-means centroid lookup (Hooper et al. 2025)
  sale            SALE's int4 q · k estimate (Ji et al. 2025)

Conventions (queries are the last Tq key positions; layouts are per query head) are in common.py.
"""
from lcjax.attention.selectors import (block_topk, centroid, flexprefill, hip, landmark, quest, sale,
                                       vertical_slash)
