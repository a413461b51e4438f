"""The caches inside the model: lossless settings of every policy reproduce the no-cache forward
through a chunked, ragged prefill and decoding (the model engineer's protocol: update with q and
num_new, then attend)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.cache import CacheConfig, make_caches
from lcjax.models import llama
from lcjax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
T, CHUNK = 20, 8

LOSSLESS = {
    "streaming": dict(budget=T, sinks=2), "h2o": dict(budget=T, window=2),
    "snapkv": dict(budget=T, obs_window=2), "razor": dict(retrieval_heads=((0, 1), (0, 1))),
    "merge": dict(merge_threshold=1.0), "quest": dict(block_size=4, top_blocks=8),
}   # window / TOVA / MiKV share the machinery of streaming / H2O (their own tests cover them)


@pytest.mark.parametrize("policy", sorted(LOSSLESS))
def test_lossless_policy_matches_full_forward(policy):
  params = llama.init(jax.random.key(0), CFG)
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, CFG.vocab_size)
  want, _ = llama.forward(params, tokens, jnp.broadcast_to(jnp.arange(T), (2, T)), None, cfg=CFG)
  caches = make_caches(CacheConfig(policy=policy, max_chunk=CHUNK, group_size=8, **LOSSLESS[policy]),
                       num_layers=CFG.n_layers, kv_heads=CFG.n_kv_heads, head_dim=CFG.head_dim, batch=2,
                       capacity=24)
  fwd = jax.jit(lambda c, tok, pos, n: llama.forward(params, tok, pos, c, cfg=CFG, num_new=n))
  # Prefill 16 tokens in two chunks, the second ragged (sequence 1 has a 13-token prompt).
  lengths = np.array([16, 13])
  pad = lambda x: np.pad(x, ((0, 0), (0, 16 - x.shape[1])))
  prompt = np.stack([pad(np.asarray(tokens[:1, :16]))[0], pad(np.asarray(tokens[1:, :13]))[0]])
  got = {0: [], 1: []}
  for s in (0, 8):
    n = np.clip(lengths - s, 0, CHUNK)
    pos = s + np.arange(CHUNK)[None].repeat(2, 0)
    logits, caches = fwd(caches, prompt[:, s:s + CHUNK], pos, jnp.asarray(n, jnp.int32))
    for b in range(2):
      got[b].append(np.asarray(logits[b, :n[b]]))
  for step in range(4):                                         # decode one token at a time
    pos = lengths + step
    tok = np.asarray(tokens)[np.arange(2), pos]
    logits, caches = fwd(caches, tok[:, None], pos[:, None], None)
    for b in range(2):
      got[b].append(np.asarray(logits[b]))
  for b, n in ((0, 20), (1, 17)):
    np.testing.assert_allclose(np.concatenate(got[b]), np.asarray(want[b, :n]), atol=2e-4, rtol=2e-4)
