"""Property tests (hypothesis): attend() over random shapes, masks and layouts equals a NumPy oracle."""
import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np

from lcjax.attention import attend, masks, to_layout
from test_attention_api import oracle
from test_layout import _mask_strategy


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(batch=st.integers(1, 2), q_len=st.integers(1, 12), kv_len=st.integers(1, 12),
                  kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), dim=st.sampled_from([4, 8]),
                  mask=_mask_strategy(), offset=st.integers(-3, 8), block=st.integers(1, 5),
                  use_layout=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_attend_matches_oracle(batch, q_len, kv_len, kv_heads, group, dim, mask, offset, block,
                                        use_layout, seed):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, q_len, kv_heads * group, dim))
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, dim))
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, dim))
  # A compiled layout of the same mask must not change the result (full blocks skip the mask).
  layout = to_layout(mask, q_len, kv_len, block, block + 1, q_offset=offset) if use_layout else None
  run = jax.jit(lambda q, k, v: attend(q, k, v, mask=mask, layout=layout, q_offset=offset, return_lse=True,
                                       implementation="xla"))
  out, lse = run(q, k, v)
  qpos = np.arange(q_len)[:, None] + offset
  allowed = np.broadcast_to(np.asarray(mask(qpos, np.arange(kv_len)[None, :])), (q_len, kv_len))
  want, want_lse = oracle(q, k, v, allowed, dim ** -0.5)
  np.testing.assert_allclose(out, want, atol=3e-6)
  np.testing.assert_allclose(lse, want_lse, atol=3e-5)
  np.testing.assert_array_equal(np.asarray(out)[:, ~allowed.any(-1)], 0)    # empty rows are zeros
