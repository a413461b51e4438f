"""Cross-layer sharing of the KV cache: CLA's layer -> owner map.

Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention"
(arXiv:2405.12981). Groups of `share` adjacent layers use the keys and values computed by the
first layer of the group; the others compute only queries. That changes the model (it is trained
that way), so it is a model option, ModelConfig.cla_share: lcjax.models.llama gives non-owner
layers no wk/wv, computes K/V at owner layers, writes them into the owner's cache, and the other
layers call `caches[cla_owner(layer, share)].attend(q)` without updating.
make_caches(..., cla_share=share) gives non-owner layers None. Memory shrinks by the factor `share`.
MiniCache (minicache.py) is the training-free relative: it merges adjacent layers' caches.
"""

from __future__ import annotations


def cla_owner(layer: int, share: int) -> int:
  """The layer whose cache `layer` reads: the first layer of its group of `share` layers."""
  if share < 1 or layer < 0:
    raise ValueError(f"layer={layer}, share={share}: need layer >= 0 and share >= 1")
  return layer - layer % share


def cla_owners(num_layers: int, share: int) -> tuple[int, ...]:
  """(owner of layer 0, owner of layer 1, ...)."""
  return tuple(cla_owner(l, share) for l in range(num_layers))
