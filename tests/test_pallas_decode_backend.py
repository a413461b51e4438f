"""lcjax.attention.decode_backend: the Pallas path (interpret mode) agrees with the XLA path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import BlockLayout
from lcjax.attention import decode_backend as db


def _cache(seed, b=2, t=1, hq=4, hkv=2, c=64, d=16):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, hq, d)), jax.random.normal(ks[1], (b, c, hkv, d)),
          jax.random.normal(ks[2], (b, c, hkv, d)))


@pytest.mark.parametrize("schedule", ["splits", "balanced"])
@pytest.mark.parametrize("layout_heads", [None, 1, 2])
def test_decode_attend_paths_agree(layout_heads, schedule):
  q, k, v = _cache(layout_heads or 0)
  lengths = jnp.array([64, 23], jnp.int32)
  layout = None
  if layout_heads:
    visible = np.random.default_rng(0).random((2, layout_heads, 1, 4)) < 0.6
    visible[..., 0] = True
    layout = BlockLayout.from_block_mask(visible, block_q=1, block_kv=16, q_len=1, kv_len=64)
  kw = dict(layout=layout, return_lse=True)
  out, lse = db.decode_attend(q, k, v, lengths, implementation="pallas", interpret=True, num_splits=2,
                              schedule=schedule, **kw)
  ref, ref_lse = db.decode_attend(q, k, v, lengths, implementation="xla", **kw)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_layout_per_query_head_agrees_and_other_head_counts_are_rejected():
  # One block list per query head (GQA, 4 query heads on 2 KV heads): each program serves one
  # query head and reads its KV head's listed blocks.
  q, k, v = _cache(1)
  lengths = jnp.array([64, 37], jnp.int32)
  visible = np.random.default_rng(1).random((2, 4, 1, 4)) < 0.5
  visible[..., 0] = True
  layout = BlockLayout.from_block_mask(visible, block_q=1, block_kv=16, q_len=1, kv_len=64)
  out = db.decode_attend(q, k, v, lengths, layout=layout, implementation="pallas", num_splits=2)
  ref = db.decode_attend(q, k, v, lengths, layout=layout, implementation="xla")
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  layout = BlockLayout.from_block_mask(np.ones((2, 3, 1, 4), bool), block_q=1, block_kv=16, q_len=1,
                                       kv_len=64)
  with pytest.raises(ValueError, match="q_heads=4"):
    db.decode_attend(q, k, v, jnp.array([5, 6], jnp.int32), layout=layout, implementation="pallas",
                     interpret=True)
  with pytest.raises(ValueError, match="implementation"):
    db.decode_attend(q, k, v, jnp.array([5, 6], jnp.int32), implementation="cuda")


def test_quantized_decode_attend_paths_agree():
  q, k, v = _cache(2, t=2, d=32)
  kv = db.quantize_kv(k, v, bits=4, key_group=32, value_group=16)
  lengths = jnp.array([64, 9], jnp.int32)
  out = db.quantized_decode_attend(q, kv, lengths, implementation="pallas", interpret=True, block_k=16)
  ref = db.quantized_decode_attend(q, kv, lengths, implementation="xla")
  np.testing.assert_allclose(out, ref, atol=3e-5, rtol=3e-5)


def test_quantized_kernel_choice_says_why_mosaic_cannot_serve():
  """Which quantised decode kernel serves a call: "auto" takes Mosaic GPU only for int8 / int4 codes
  with int8_mma and no Triton-only option, on a Hopper GPU (never on this CPU); "mosaic" names why not."""
  S = jax.ShapeDtypeStruct
  q = S((2, 1, 8, 128), jnp.bfloat16)
  cache = lambda bits: jax.eval_shape(lambda: db.quantize_kv(jnp.zeros((2, 256, 2, 128)), jnp.zeros((2, 256, 2, 128)),
                                                             bits=bits, key_group=128, value_group=64))
  int8, int4 = cache(8), cache(4)
  pick = lambda kv, kernel="auto", interpret=False, **o: db._quantized_kernel(q, kv, kernel, interpret, o)
  assert pick(int8, int8_mma=True) == "triton"            # no Hopper GPU here
  assert pick(int8, "triton", int8_mma=True) == "triton"
  assert pick(int8, "mosaic", int8_mma=True) == "mosaic"
  assert pick(int4, "mosaic", int8_mma=True, block_k=256) == "mosaic"
  for kv, options, interpret, why in [(int4, dict(int8_mma=True, num_warps=4), False, "num_warps"),
                                      (int8, dict(int8_mma=False), False, "int8_mma=False"),
                                      (int8, dict(int8_mma=True, block_k=64), False, "block_k 64"),
                                      (int8, dict(int8_mma=True), True, "interpret")]:
    with pytest.raises(ValueError, match=why):
      pick(kv, "mosaic", interpret, **options)
  with pytest.raises(ValueError, match="kernel must be"):
    pick(int8, "cuda")


def test_linear_paths_agree():
  q, k, v = _cache(3, b=1, t=20, hq=2, hkv=2, c=20)
  decay = jnp.array([-0.1, -0.02])
  out, state = db.linear_attention(q, k, v, decay, return_state=True, implementation="pallas",
                                   interpret=True, chunk_size=16, block_v=16)
  ref, ref_state = db.linear_attention(q, k, v, decay, return_state=True, implementation="xla")
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(state, ref_state, atol=1e-4, rtol=1e-4)
  step = db.linear_attention_decode_step(state, q[:, 0], k[:, 0], v[:, 0], decay, implementation="pallas",
                                         interpret=True, block_v=16)
  ref_step = db.linear_attention_decode_step(ref_state, q[:, 0], k[:, 0], v[:, 0], decay, implementation="xla")
  for a, r in zip(step, ref_step):
    np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t", [1, 2])
def test_dense_cache_decodes_through_the_kernel(t, monkeypatch):
  # DenseKVCache.attend sends decode steps to decode_attend; "pallas" on a CPU runs the kernel in
  # interpret mode. The kernel really runs (spied), and agrees with the XLA path, NaN on overflow.
  from lcjax.cache import DenseKVCache
  from pallas_kernels.gpu import decode as decode_kernels
  q, k, v = _cache(4, t=t)
  cache = DenseKVCache.create(2, 64, 2, 16).update(k[:, :40], v[:, :40])
  cache = cache.update(k[:, 40:40 + t], v[:, 40:40 + t], num_new=jnp.array([t, 0], jnp.int32))
  calls = []
  real = decode_kernels.decode_attention
  monkeypatch.setattr(decode_kernels, "decode_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  out = cache.attend(q, implementation="pallas")
  assert calls and calls[0]["interpret"]
  ref = cache.attend(q, implementation="xla")
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  over = DenseKVCache(cache.k, cache.v, jnp.array([65, 40], jnp.int32))
  out = over.attend(q, implementation="pallas")
  assert np.isnan(np.asarray(out[0])).all() and np.isfinite(np.asarray(out[1])).all()


def test_decode_unsupported_reason_names_the_limit():
  q, k, v = _cache(5, t=40)
  assert "prefill" in db.decode_unsupported_reason(q, k, v)
  q, k, v = _cache(5, t=1)
  assert db.decode_unsupported_reason(q.astype(jnp.bfloat16), k, v).startswith("q, k, v dtypes")
  assert db.decode_unsupported_reason(q, k, v) is None
  assert "block_size 8" in db.decode_unsupported_reason(q, k, v, block_size=8)
  assert db.decode_unsupported_reason(q, k, v, block_size=32) is None


@pytest.mark.parametrize("kv_heads,select_per", [(2, "query_head"), (4, "query_head"), (2, "kv_head")])
@pytest.mark.parametrize("cache_name", ["QuestKVCache", "LandmarkKVCache"])
def test_block_retrieval_caches_decode_through_the_sparse_kernel(cache_name, kv_heads, select_per, monkeypatch):
  # Quest / landmark select blocks per query head (or per KV head); on the Pallas path the
  # block-sparse kernel reads exactly those (one list per selecting head) and agrees with the
  # masked XLA path.
  import lcjax.cache as caches
  from pallas_kernels.gpu import decode as decode_kernels
  q, k, v = _cache(6, t=1, hq=4, hkv=kv_heads, c=128)
  cache = getattr(caches, cache_name).create(2, 128, kv_heads, 16, block_size=16, top_blocks=2,
                                             local_blocks=1, select_per=select_per)
  cache = cache.update(k[:, :90], v[:, :90]).update(k[:, 90:91], v[:, 90:91], num_new=jnp.array([1, 0]))
  calls = []
  real = decode_kernels.decode_attention
  monkeypatch.setattr(decode_kernels, "decode_attention",
                      lambda *a, **kw: calls.append(a[4].shape) or real(*a, **kw))
  out = cache.attend(q, implementation="pallas")
  heads = 4 if select_per == "query_head" else kv_heads
  assert calls == [(2, heads, 3)]                    # block lists [B, Hq or Hkv, top + local blocks]
  ref = cache.attend(q, implementation="xla")
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
