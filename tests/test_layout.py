"""to_layout: exact visible/full block tables against a brute-force NumPy oracle."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import attend, layouts, masks, to_layout


def oracle(mask, q_len, kv_len, bq, bk, q_offset=0, seg=None, kv_seg=None):
  """[B or 1, nQ, nK] visible/full by looping over blocks of the dense element mask."""
  q = np.arange(q_len)[:, None] + q_offset
  allowed = np.broadcast_to(np.asarray(mask(q, np.arange(kv_len)[None, :])), (q_len, kv_len))[None]
  if seg is not None:
    allowed = allowed & (seg[:, :, None] == kv_seg[:, None, :])
  n_q, n_k = -(-q_len // bq), -(-kv_len // bk)
  visible = np.zeros((allowed.shape[0], n_q, n_k), bool)
  full = np.zeros_like(visible)
  for i in range(n_q):
    for j in range(n_k):
      block = allowed[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
      visible[:, i, j] = block.any((1, 2))
      full[:, i, j] = block.all((1, 2)) & ((j + 1) * bk <= kv_len)
  return visible, full


MASKS = [masks.full(), masks.causal(), masks.sliding_window(5), masks.sliding_window(2, 3),
         masks.sinks(3) | masks.sliding_window(4), masks.chunked(6) & masks.causal(),
         masks.prefix_lm(7), masks.dilated_window(4, 3), ~masks.chunked(5)]


@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize("q_len,kv_len,bq,bk,offset", [(17, 17, 4, 4, 0), (13, 23, 3, 5, 10),
                                                      (9, 9, 8, 2, -3), (20, 11, 6, 7, 0)])
def test_host_layout_matches_oracle(mask, q_len, kv_len, bq, bk, offset):
  layout = to_layout(mask, q_len, kv_len, bq, bk, q_offset=offset)
  visible, full = layout.block_mask()
  want_visible, want_full = oracle(mask, q_len, kv_len, bq, bk, offset)
  np.testing.assert_array_equal(visible[0], want_visible)
  np.testing.assert_array_equal(full[0], want_full)
  np.testing.assert_array_equal(layout.q_counts[0, 0], want_visible[0].sum(0))   # the transpose


def test_traced_offset_matches_host_and_is_jittable():
  mask = masks.sinks(2) | masks.sliding_window(5)
  host = to_layout(mask, 19, 30, 4, 6, q_offset=11)
  traced = jax.jit(lambda off: to_layout(mask, 19, 30, 4, 6, q_offset=off))(jnp.int32(11))
  for a, b in zip(host.block_mask(), traced.block_mask()):
    np.testing.assert_array_equal(a, b)


def test_segment_ids_layout_matches_oracle_under_jit():
  rng = np.random.default_rng(0)
  seg = np.sort(rng.integers(0, 4, (3, 21)), axis=1).astype(np.int32)    # packed documents
  build = jax.jit(lambda s: to_layout(masks.causal(), 21, 21, 4, 4, segment_ids=s))
  visible, full = build(jnp.asarray(seg)).block_mask()
  want_visible, want_full = oracle(masks.causal(), 21, 21, 4, 4, 0, seg, seg)
  np.testing.assert_array_equal(visible[:, 0], want_visible)
  np.testing.assert_array_equal(full[:, 0], want_full)


def test_attend_over_compiled_layout_is_exact():
  """Blocks marked full skip the element mask in the reference: only exact tables keep it exact."""
  q, k, v = (jax.random.normal(key, (2, 21, 2, 8)) for key in jax.random.split(jax.random.key(3), 3))
  seg = jnp.asarray(np.repeat([[0, 1, 2], [0, 0, 1]], 7, axis=1), jnp.int32)
  mask = masks.sinks(2) | masks.sliding_window(6)
  layout = to_layout(mask, 21, 21, 4, 4, segment_ids=seg)
  want = attend(q, k, v, mask=mask, segment_ids=seg, implementation="xla")
  got = attend(q, k, v, mask=mask, segment_ids=seg, layout=layout, implementation="xla")
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_host_layouts_are_cached_and_read_only():
  a = to_layout(masks.causal(), 64, 64, 16, 16)
  assert a is to_layout(masks.causal(), 64, 64, 16, 16)
  with pytest.raises(ValueError):
    a.kv_indices[0, 0, 0, 0] = 3


def test_host_compilation_in_chunks(monkeypatch):
  monkeypatch.setattr(layouts, "_HOST_CHUNK_ELEMENTS", 40)       # one query block per chunk
  mask = masks.chunked(5) | masks.sinks(1)
  visible, full = layouts.host_block_tables.__wrapped__(mask, 23, 19, 3, 4, 2)
  want_visible, want_full = oracle(mask, 23, 19, 3, 4, 2)
  np.testing.assert_array_equal(visible, want_visible[0])
  np.testing.assert_array_equal(full, want_full[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=jnp.int32(4)), "block_q"), (dict(block_kv=0), "block_kv"), (dict(q_len=2.0), "q_len"),
    (dict(mask="causal"), "mask"), (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), "segment_ids"),
])
def test_bad_arguments_are_named(kwargs, match):
  args = dict(mask=masks.causal(), q_len=8, kv_len=8, block_q=4, block_kv=4) | kwargs
  with pytest.raises(ValueError, match=match):
    to_layout(args.pop("mask"), args.pop("q_len"), args.pop("kv_len"), args.pop("block_q"),
              args.pop("block_kv"), **args)


def _mask_strategy():
  leaf = st.one_of(st.just(masks.causal()), st.builds(masks.sliding_window, st.integers(0, 9), st.integers(0, 4)),
                   st.builds(masks.sinks, st.integers(0, 5)), st.builds(masks.chunked, st.integers(1, 8)),
                   st.builds(masks.prefix_lm, st.integers(0, 8)), st.builds(masks.strided, st.integers(1, 4)))
  return st.recursive(leaf, lambda inner: st.one_of(st.builds(lambda a, b: a & b, inner, inner),
                                                    st.builds(lambda a, b: a | b, inner, inner),
                                                    st.builds(lambda a: ~a, inner)), max_leaves=3)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(mask=_mask_strategy(), q_len=st.integers(1, 24), kv_len=st.integers(1, 24),
                  bq=st.integers(1, 8), bk=st.integers(1, 8), offset=st.integers(-4, 12))
def test_property_layout_is_exact(mask, q_len, kv_len, bq, bk, offset):
  layout = to_layout(mask, q_len, kv_len, bq, bk, q_offset=offset)
  visible, full = layout.block_mask()
  want_visible, want_full = oracle(mask, q_len, kv_len, bq, bk, offset)
  np.testing.assert_array_equal(visible[0], want_visible)
  np.testing.assert_array_equal(full[0], want_full)
  counts = np.asarray(layout.kv_counts[0, 0])
  assert (np.asarray(layout.kv_indices[0, 0])[:, :max(counts.max(initial=0), 1)] < layout.num_kv_blocks).all()


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(mask=_mask_strategy(), q_len=st.integers(1, 20), kv_len=st.integers(1, 20), bq=st.integers(1, 6),
                  bk=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_property_segment_layout_is_exact(mask, q_len, kv_len, bq, bk, seed):
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(0, 3, (2, q_len)), axis=1).astype(np.int32)
  kv_seg = np.sort(rng.integers(0, 3, (2, kv_len)), axis=1).astype(np.int32)
  layout = to_layout(mask, q_len, kv_len, bq, bk, segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(kv_seg))
  visible, full = layout.block_mask()
  want_visible, want_full = oracle(mask, q_len, kv_len, bq, bk, 0, seg, kv_seg)
  np.testing.assert_array_equal(visible[:, 0], want_visible)
  np.testing.assert_array_equal(full[:, 0], want_full)


def test_from_kv_lists_matches_from_block_mask():
  # Random key-block lists (some rows empty) against the layout built from their dense table.
  from lcjax.attention import BlockLayout
  rng = np.random.default_rng(0)
  b, h, n_q, n_kv, k = 2, 3, 2, 7, 4
  counts = rng.integers(0, k + 1, (b, h, n_q))
  idx = np.zeros((b, h, n_q, k), np.int32)
  visible = np.zeros((b, h, n_q, n_kv), bool)
  full = rng.random((b, h, n_q, n_kv)) < 0.5
  for i in np.ndindex(b, h, n_q):
    chosen = np.sort(rng.permutation(n_kv)[:counts[i]])
    visible[i][chosen] = True
    idx[i] = np.concatenate([chosen, np.full(k - counts[i], chosen[-1] if counts[i] else 0)])
  sizes = dict(block_q=4, block_kv=3, q_len=8, kv_len=20)
  kv_full = np.take_along_axis(full, idx, -1)
  got = jax.jit(lambda i, c, f: BlockLayout.from_kv_lists(i, c, f, **sizes))(idx, counts.astype(np.int32), kv_full)
  want = BlockLayout.from_block_mask(jnp.asarray(visible), jnp.asarray(full), **sizes)
  for g, w in zip(got.block_mask(), want.block_mask()):
    np.testing.assert_array_equal(g, w)
  np.testing.assert_array_equal(got.kv_indices, idx)
  for name in ("q_indices", "q_counts", "q_full"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
  with pytest.raises(ValueError, match="kv_counts"):
    BlockLayout.from_kv_lists(idx, counts[..., :1], **sizes)
  with pytest.raises(ValueError, match="num_q_blocks=2"):
    BlockLayout.from_kv_lists(idx[:, :, :1], counts[:, :, :1], **sizes)
