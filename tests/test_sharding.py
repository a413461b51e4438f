"""Sharding: the rules table, and the train step on a 2x2x2 mesh matching the one-device run."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lcjax import models
from lcjax.config import MeshConfig, OptimizerConfig
from lcjax.sharding import LOGICAL_AXIS_RULES, batch_sharding, logical_to_shardings, logical_to_spec, make_mesh
from lcjax.train import grads_and_metrics, init_state, jit_train_step, make_optimizer, train_step
from lcjax.train.loop import place_batch

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")


def test_rules_table_has_every_logical_axis_the_model_uses():
  cfg = models.ModelConfig(vocab_size=384, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                           qkv_bias=True)
  used = {a for axes in jax.tree.leaves(models.param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
          for a in axes}
  assert used <= dict(LOGICAL_AXIS_RULES).keys()


@needs_8
def test_logical_to_spec_drops_what_cannot_split():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert logical_to_spec(("batch", "seq"), mesh) == P(("data", "fsdp"), None)
  assert logical_to_spec(("embed", "q_heads", "head_dim"), mesh, (32, 4, 8)) == P("fsdp", "tensor", None)
  # kv_heads=1 (MQA) cannot split over tensor=2: replicated on that dim.
  assert logical_to_spec(("embed", "kv_heads", "head_dim"), mesh, (32, 1, 8)) == P("fsdp", None, None)
  # An axis is used once per array.
  assert logical_to_spec(("embed", "embed"), mesh, (4, 4)) == P("fsdp", None)
  one = make_mesh(MeshConfig())
  assert logical_to_spec(("batch", "embed"), one) == P(None, None)
  with pytest.raises(ValueError, match="logical axis 'nonsense'"):
    logical_to_spec(("nonsense",), mesh)
  with pytest.raises(ValueError, match="config.mesh.*16 devices"):
    make_mesh(MeshConfig(data=4, fsdp=2, tensor=2))


def random_batch(key, batch, seq, vocab):
  k1, k2, k3 = jax.random.split(key, 3)
  tokens = np.asarray(jax.random.randint(k1, (batch, seq), 0, vocab))
  # Two packed segments per row, positions restarting, and a random 0/1 loss mask.
  cut = seq // 3
  segment_ids = np.where(np.arange(seq) < cut, 1, 2)[None].repeat(batch, 0).astype(np.int32)
  positions = np.where(np.arange(seq) < cut, np.arange(seq), np.arange(seq) - cut)[None].repeat(batch, 0)
  return {"tokens": tokens, "targets": np.asarray(jax.random.randint(k2, (batch, seq), 0, vocab)),
          "loss_mask": np.asarray(jax.random.bernoulli(k3, 0.7, (batch, seq)), np.float32),
          "segment_ids": segment_ids, "positions": positions.astype(np.int32)}


def run_on(mesh_cfg, model_cfg, batch, accum=1):
  """One jitted train step on a mesh: returns (loss, grads, new params) on the host."""
  mesh = make_mesh(mesh_cfg)
  tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=10), 10)
  state, shardings = init_state(jax.random.key(0), model_cfg, tx, mesh, init=models.init,
                                param_logical_axes=models.param_logical_axes)
  placed = place_batch(batch, batch_sharding(mesh))
  grad_fn = jax.jit(functools.partial(grads_and_metrics, forward=models.forward, model_cfg=model_cfg, accum=accum),
                    in_shardings=(shardings["params"], {k: batch_sharding(mesh) for k in placed}))
  grads, metrics = grad_fn(state["params"], placed)
  step = jit_train_step(functools.partial(train_step, forward=models.forward, model_cfg=model_cfg, tx=tx,
                                          schedule=schedule, accum=accum),
                        shardings, batch_sharding(mesh), jax.sharding.NamedSharding(mesh, P()))
  new_state, _ = step(state, placed)
  return jax.device_get((metrics["loss"], grads, new_state["params"])), new_state["params"]


MODEL = models.ModelConfig(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                           max_seq_len=64)


@functools.cache
def one_device_run():
  return run_on(MeshConfig(), MODEL, random_batch(jax.random.key(1), 8, 24, 300))[0]


@needs_8
def test_train_step_2x2x2_matches_one_device():
  """data x fsdp x tensor = 2x2x2 vs one device: the same loss, gradients and updated params."""
  loss1, grads1, params1 = one_device_run()
  (loss8, grads8, params8), sharded = run_on(MeshConfig(data=2, fsdp=2, tensor=2), MODEL,
                                             random_batch(jax.random.key(1), 8, 24, 300))
  # Parameters really are split: wq [dim, heads, head_dim] over fsdp and tensor.
  wq = sharded["layers"][0]["wq"]
  assert wq.sharding.spec == P("fsdp", "tensor", None)
  assert wq.addressable_shards[0].data.shape == (16, 2, 8)
  assert sharded["embed"].sharding.spec == P("tensor", "fsdp")
  assert np.isfinite(loss1) and loss1 > 1.0
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for g8, g1 in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1)):
    assert np.abs(g1).max() > 0
    np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)
  # One AdamW step of lr 1e-2 moves each weight by lr * g / (|g| + eps), about lr * sign(g): 2e-5 is
  # 0.2% of it. Where |g| is near Adam's eps (1e-8) the step amplifies g's float rounding (the
  # activation constraints reorder reductions): there only a bound well below lr.
  for p8, p1, g1 in zip(jax.tree.leaves(params8), jax.tree.leaves(params1), jax.tree.leaves(grads1)):
    steady = np.abs(g1) > 1e-6
    np.testing.assert_allclose(p8[steady], p1[steady], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(p8, p1, rtol=0, atol=1e-4)


@needs_8
def test_gradient_accumulation_matches_full_batch_on_mesh():
  """Two scanned micro-batches on data x tensor = 2x2 vs the whole batch on one device."""
  loss1, grads1, _ = one_device_run()
  (loss4, grads4, _), _ = run_on(MeshConfig(data=2, fsdp=1, tensor=2), MODEL,
                                 random_batch(jax.random.key(1), 8, 24, 300), accum=2)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  for g4, g1 in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-6)


@needs_8
def test_greedy_generate_on_2x2x2_mesh_matches_one_device():
  """generate (prefill + decode loop, one jit) with params and prompts sharded over the mesh."""
  from lcjax.eval.scoring import make_greedy_answerer
  from lcjax.models.generate import generate
  params = models.init(jax.random.key(4), MODEL)
  rng = np.random.default_rng(4)
  batch = {"tokens": rng.integers(0, 259, (4, 20)).astype(np.int32),
           "answer_start": np.asarray([11, 15, 18, 9]), "answer_length": np.asarray([3, 3, 2, 3])}
  mesh1 = make_mesh(MeshConfig())
  want = make_greedy_answerer(generate, MODEL, mesh1)(params, batch)
  mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  shardings = logical_to_shardings(models.param_logical_axes(MODEL), mesh8, params)
  sharded = jax.device_put(params, shardings)
  assert sharded["layers"][0]["w_gate"].sharding.spec == P("fsdp", "tensor")
  got = make_greedy_answerer(generate, MODEL, mesh8)(sharded, batch)
  assert got.shape == (4, 3)
  np.testing.assert_array_equal(got, want)


# --- Activations and caches: logical axes, constraints under a mesh, generate(mesh=...) -------------------

def test_rules_table_has_every_activation_and_cache_axis():
  from lcjax.cache import CacheConfig, POLICIES, cache_logical_axes, make_cache
  from lcjax.models import llama
  names = {a for axes in llama.ACTIVATION_AXES.values() for a in axes}
  for policy in POLICIES:
    cache = jax.eval_shape(lambda p=policy: make_cache(
        CacheConfig(policy=p, budget=16, window=4, max_chunk=8, group_size=8, residual=8, block_size=8), 0,
        num_layers=2, kv_heads=2, head_dim=8, batch=4, capacity=48))
    axes = cache_logical_axes(cache)
    leaves, treedef = jax.tree.flatten(cache)
    for la, x in zip(treedef.flatten_up_to(axes), leaves):   # one tuple per array, batch first
      assert len(la) == len(x.shape) and la[0] == "batch", (policy, la, x.shape)
      names.update(a for a in la if a is not None)
  assert names <= dict(LOGICAL_AXIS_RULES).keys()


@needs_8
def test_cache_logical_axes_give_the_rules_shardings():
  """DenseKVCache names its axes; a cache that does not (Quest) gets batch-first, rest replicated."""
  from lcjax.cache import DenseKVCache, QuestKVCache, cache_logical_axes
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  dense = jax.eval_shape(lambda: DenseKVCache.create(4, 16, 2, 8))
  sh = logical_to_shardings(cache_logical_axes(dense), mesh, dense)
  assert sh.k.spec == sh.v.spec == P(("data", "fsdp"), None, "tensor", None)
  assert sh.lengths.spec == P(("data", "fsdp"))
  quest = jax.eval_shape(lambda: QuestKVCache.create(4, 16, 2, 8, block_size=4, top_blocks=2, local_blocks=1))
  sh = logical_to_shardings(cache_logical_axes(quest), mesh, quest)
  assert sh.kmin.spec == P(("data", "fsdp"), None, None, None) and sh.lengths.spec == P(("data", "fsdp"))


@needs_8
def test_forward_with_activation_constraints_on_2x2x2_matches_one_device():
  """llama.forward under jax.set_mesh(2x2x2): activations constrained by the rules, same logits."""
  cfg = models.ModelConfig(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                           max_seq_len=64, qkv_bias=True)
  params = models.init(jax.random.key(2), cfg)
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (8, 16), 0, cfg.vocab_size), np.int32)
  positions = np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16))
  fwd = jax.jit(lambda p, t, pos: models.forward(p, t, pos, cfg=cfg)[0])
  lowered = fwd.lower(params, tokens, positions)
  assert lowered.as_text().count("sharding_constraint") == 0          # no mesh set: no constraints
  want = np.asarray(lowered.compile()(params, tokens, positions))

  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = jax.device_put(params, logical_to_shardings(models.param_logical_axes(cfg), mesh, params))
  placed = [jax.device_put(x, batch_sharding(mesh)) for x in (tokens, positions)]
  with jax.set_mesh(mesh):
    lowered = fwd.lower(sharded, *placed)
    assert lowered.as_text().count("sharding_constraint") > 5 * cfg.n_layers
    got = lowered.compile()(sharded, *placed)
  assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")      # logits ("batch", "seq", "vocab")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@needs_8
def test_generate_with_mesh_places_caches_by_the_rules_and_matches_one_device():
  from lcjax.cache import CacheConfig, make_caches
  from lcjax.models.generate import generate
  params = models.init(jax.random.key(5), MODEL)
  rng = np.random.default_rng(5)
  prompts = rng.integers(0, MODEL.vocab_size, (4, 10)).astype(np.int32)
  lengths = np.asarray([10, 7, 4, 9], np.int32)
  kw = dict(key=None, prefill_chunk=4)
  want = generate(params, MODEL, prompts, lengths, 5, **kw)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  got = generate(params, MODEL, prompts, lengths, 5, mesh=mesh, return_caches=True, **kw)
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  np.testing.assert_array_equal(got["lengths"], want["lengths"])
  assert got["tokens"].sharding.spec == P(("data", "fsdp"), None)
  for cache in got["caches"]:                        # generate built DenseKVCaches; placed by the rules
    assert cache.k.sharding.spec == cache.v.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    assert cache.lengths.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(cache.lengths, lengths + 5)
  # Given caches without their own logical_axes: Quest reading every block (lossless, so the dense
  # tokens) gets the batch-first default.
  caches = make_caches(CacheConfig(policy="quest", block_size=2, top_blocks=16), num_layers=MODEL.n_layers,
                       kv_heads=MODEL.n_kv_heads, head_dim=MODEL.head_dim, batch=4, capacity=16)
  got = generate(params, MODEL, prompts, lengths, 5, caches=caches, mesh=mesh, return_caches=True, **kw)
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  assert got["caches"][0].kmax.sharding.spec == P(("data", "fsdp"), None, None, None)


@needs_8
@pytest.mark.parametrize("cache_kind", ["dense", "dense_balanced", "sparse", "int8"])
def test_decode_kernels_run_per_shard_under_a_mesh(cache_kind):
  """Under jax.set_mesh the decode kernels run inside a shard_map over (batch, KV heads): the
  same output as on one device, left sharded like q, and no all-gather of the cache (a Pallas
  call is one custom call that XLA cannot partition: without the shard_map it gathers)."""
  from jax.sharding import NamedSharding
  from lcjax.attention import decode_backend
  from lcjax.attention.layout import BlockLayout
  b, c, hq, hkv, d = 4, 64, 8, 2, 16
  kq, kk, kv = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(kq, (b, 1, hq, d))
  k, v = jax.random.normal(kk, (b, c, hkv, d)), jax.random.normal(kv, (b, c, hkv, d))
  lengths = jnp.array([64, 30, 5, 1], jnp.int32)
  opts = dict(implementation="pallas", return_lse=True, block_k=16, num_splits=2)
  if cache_kind == "dense_balanced":   # the schedule built per shard from its own lengths
    opts["schedule"] = "balanced"
  if cache_kind == "int8":
    cache = decode_backend.quantize_kv(k, v, bits=8, key_group=16, value_group=16)
    attend = lambda q, cache, l: decode_backend.quantized_decode_attend(q, cache, l, **opts)
  else:
    layout = None
    if cache_kind == "sparse":   # one list per query head: key blocks 0 and 2 of 4
      visible = np.broadcast_to(np.array([True, False, True, False]), (b, hq, 1, 4))
      layout = BlockLayout.from_block_mask(visible, block_q=16, block_kv=16, q_len=1, kv_len=c)
    cache = (k, v)
    attend = lambda q, cache, l: decode_backend.decode_attend(q, *cache, l, layout=layout, **opts)
  want_out, want_lse = attend(q, cache, lengths)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), *spec)))
  heads = lambda x, axis: put(x, *[("tensor" if i == axis else None) for i in range(1, x.ndim)])
  if cache_kind == "int8":
    sharded = type(cache)(*(heads(x, 2 if i < 3 else 1) for i, x in enumerate(cache)))
  else:
    sharded = tuple(heads(x, 2) for x in cache)
  f = jax.jit(attend)
  with jax.set_mesh(mesh):
    args = (heads(q, 2), sharded, put(lengths))
    out, lse = f(*args)
    hlo = f.lower(*args).compile().as_text()
  np.testing.assert_allclose(out, want_out, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, atol=1e-6)
  assert out.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
  assert "all-gather" not in hlo
