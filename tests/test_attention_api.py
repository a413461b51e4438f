"""attend(): layouts of several block sizes, GQA, score mods, lse, segments, bf16, bad input.

Every check is against a float64 NumPy oracle on random inputs.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import BlockLayout, attend, masks, score_mods


def oracle(q, k, v, allowed, scale, logits_fn=None):
  """float64 (out [B, Tq, Hq, D], lse [B, Hq, Tq]); allowed bool broadcastable to [B, Hq, Tq, Tk]."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if logits_fn is not None:
    s = logits_fn(s)
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  p = np.exp(s - m)
  l = p.sum(-1, keepdims=True)
  with np.errstate(divide="ignore"):
    lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(l[..., 0]), -np.inf)
  return np.einsum("bhqk,bkhd->bqhd", p / np.where(l == 0, 1, l), v), lse


def rand(key, *shapes, dtype=jnp.float32):
  return [jax.random.normal(k, s, dtype) for k, s in zip(jax.random.split(jax.random.key(key), len(shapes)), shapes)]


def expand(table, bq, bk, q_len, kv_len):
  return np.repeat(np.repeat(np.asarray(table), bq, -2)[..., :q_len, :], bk, -1)[..., :kv_len]


@pytest.mark.parametrize("bq,bk", [(4, 4), (3, 5), (8, 2)])
@pytest.mark.parametrize("layout_heads", [1, 2, 4])
def test_layout_with_causal_gqa_odd_lengths(bq, bk, layout_heads):
  q_len, kv_len, offset = 13, 19, 6
  q, k, v = rand(bq * 10 + bk, (2, q_len, 4, 8), (2, kv_len, 2, 8), (2, kv_len, 2, 8))
  rng = np.random.default_rng(layout_heads)
  grid = (2, layout_heads, -(-q_len // bq), -(-kv_len // bk))
  visible = rng.random(grid) < 0.6
  full = visible & (rng.random(grid) < 0.5)
  layout = BlockLayout.from_block_mask(visible, full, block_q=bq, block_kv=bk, q_len=q_len, kv_len=kv_len)
  out, lse = attend(q, k, v, mask=masks.causal(), layout=layout, q_offset=offset, return_lse=True,
                    implementation="xla")
  causal = (np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + offset)
  head_of = np.arange(4) * layout_heads // 4
  allowed = expand(visible, bq, bk, q_len, kv_len)[:, head_of] & (
      expand(full, bq, bk, q_len, kv_len)[:, head_of] | causal)
  want, want_lse = oracle(q, k, v, allowed, 8 ** -0.5)
  np.testing.assert_allclose(out, want, atol=2e-6)
  np.testing.assert_allclose(lse, want_lse, atol=2e-5)


def test_soft_cap_and_alibi_score_mods():
  q, k, v = rand(1, (2, 11, 4, 16), (2, 11, 1, 16), (2, 11, 1, 16))
  q = q * 4                                                   # large logits so that the cap bites
  slopes = np.asarray(score_mods.alibi_slopes(4))
  distance = np.arange(11)[None, :] - np.arange(11)[:, None]
  mod = score_mods.compose(score_mods.soft_cap(5.0), score_mods.alibi(4))
  out = attend(q, k, v, mask=masks.causal(), score_mod=mod, implementation="xla")
  want, _ = oracle(q, k, v, distance <= 0, 0.25,
                   lambda s: 5.0 * np.tanh(s / 5.0) + slopes[None, :, None, None] * distance)
  np.testing.assert_allclose(out, want, atol=2e-6)


def test_alibi_slopes_follow_the_paper():
  np.testing.assert_allclose(score_mods.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
  six = score_mods.alibi_slopes(6)          # 4 slopes of n=4, then the odd ones of n=8
  np.testing.assert_allclose(six, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_segments_valid_len_and_per_row_offsets_with_empty_rows():
  q, k, v = rand(2, (2, 7, 2, 8), (2, 12, 2, 8), (2, 12, 2, 8))
  seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2], [5, 5, 5, 5, 6, 6, 6]], jnp.int32)
  kv_seg = jnp.asarray([[0] * 4 + [1] * 4 + [3] * 4, [5] * 6 + [6] * 6], jnp.int32)
  offset = jnp.asarray([5, 3], jnp.int32)
  valid = jnp.asarray([12, 8], jnp.int32)
  out, lse = attend(q, k, v, mask=masks.causal(), segment_ids=seg, kv_segment_ids=kv_seg, q_offset=offset,
                    kv_valid_len=valid, return_lse=True, implementation="xla")
  qpos = np.arange(7)[None, :, None] + np.asarray(offset)[:, None, None]
  kpos = np.arange(12)[None, None, :]
  allowed = (kpos <= qpos) & (np.asarray(seg)[:, :, None] == np.asarray(kv_seg)[:, None, :])
  allowed &= kpos < np.asarray(valid)[:, None, None]
  want, want_lse = oracle(q, k, v, allowed[:, None], 8 ** -0.5)
  assert (~allowed.any(-1)).sum() >= 2                          # segment 2 of row 0 sees nothing
  np.testing.assert_allclose(out, want, atol=2e-6)
  np.testing.assert_allclose(lse, want_lse, atol=2e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_bf16_inputs_keep_float32_statistics():
  q, k, v = rand(4, (1, 64, 2, 32), (1, 64, 2, 32), (1, 64, 2, 32), dtype=jnp.bfloat16)
  out, lse = attend(q, k, v, mask=masks.causal(), return_lse=True, implementation="xla")
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  want, want_lse = oracle(q, k, v, np.tril(np.ones((64, 64), bool)), 32 ** -0.5)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=1.5e-2)   # bf16 output rounding
  np.testing.assert_allclose(lse, want_lse, atol=1e-4)      # lse itself is float32-exact


def _bad(**overrides):
  q, k, v = jnp.ones((1, 8, 4, 16)), jnp.ones((1, 8, 2, 16)), jnp.ones((1, 8, 2, 16))
  args = dict(q=q, k=k, v=v) | overrides
  return args.pop("q"), args.pop("k"), args.pop("v"), args


LAYOUT = BlockLayout.from_block_mask(np.ones((1, 1, 2, 2), bool), block_q=4, block_kv=4, q_len=8, kv_len=8)


@pytest.mark.parametrize("overrides,match", [
    (dict(q=jnp.ones((1, 8, 4, 8))), "head_dim"),
    (dict(q=jnp.ones((2, 8, 4, 16))), "batch"),
    (dict(k=jnp.ones((1, 8, 3, 16)), v=jnp.ones((1, 8, 3, 16))), "multiple of kv heads"),
    (dict(q=jnp.ones((8, 4, 16))), "4-d"),
    (dict(q=jnp.ones((1, 8, 4, 16), jnp.int32)), "dtype"),
    (dict(layout=BlockLayout.from_block_mask(np.ones((1, 1, 3, 2), bool), block_q=3, block_kv=4, q_len=9,
                                             kv_len=8)), "q_len=9"),
    (dict(layout=dataclasses.replace(LAYOUT, block_q=2)), "query blocks"),
    (dict(layout=dataclasses.replace(LAYOUT, block_kv=8)), "key blocks"),
    (dict(layout=BlockLayout.from_block_mask(np.ones((1, 3, 2, 2), bool), block_q=4, block_kv=4, q_len=8,
                                             kv_len=8)), "layout heads"),
    (dict(mask="causal"), "mask"),
    (dict(scale=-1.0), "scale"),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), "segment_ids"),
    (dict(kv_segment_ids=jnp.zeros((1, 8), jnp.int32)), "kv_segment_ids"),
    (dict(q_offset=jnp.zeros((3,), jnp.int32)), "q_offset"),
    (dict(kv_valid_len=jnp.zeros((1, 8), jnp.int32)), "kv_valid_len"),
    (dict(implementation="cuda"), "implementation"),
])
def test_bad_input_names_the_argument(overrides, match):
  q, k, v, kwargs = _bad(**overrides)
  with pytest.raises(ValueError, match=match):
    attend(q, k, v, **kwargs)


def test_bad_score_mod_parameters():
  with pytest.raises(ValueError, match="cap"):
    score_mods.soft_cap(0.0)
  with pytest.raises(ValueError, match="slopes"):
    score_mods.alibi(4, slopes=[1.0, 2.0])
  q, k, v, _ = _bad()
  with pytest.raises(ValueError, match="slopes"):
    attend(q, k, v, score_mod=score_mods.alibi(2))
