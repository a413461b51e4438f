"""generate(): greedy against a no-cache reference loop, batching, sampling constraints, stops."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.models import ModelConfig, llama, sampling
from lcjax.models.generate import generate

CFG = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, qkv_bias=True,
                  sliding_window=6, max_seq_len=64)
PROMPT_LENGTHS = np.array([9, 4, 7], np.int32)
NEW = 10


@functools.lru_cache(maxsize=None)
def params():
  """Random weights spread enough that generations are not one repeated token."""
  p = llama.init(jax.random.key(0), CFG)
  leaves, treedef = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def prompts():
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (3, PROMPT_LENGTHS.max()), 0, CFG.vocab_size))
  return np.where(np.arange(tokens.shape[1]) < PROMPT_LENGTHS[:, None], tokens, 0).astype(np.int32)


@functools.partial(jax.jit, static_argnames="length")
def _reference_logits(p, tokens, length):
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (1, length))
  return llama.forward(p, tokens[None, :length], positions, cfg=CFG)[0][0]


def reference_logits(sequence):
  """No-cache logits [len, V] of one whole sequence (prompt + generated), padded to a fixed size."""
  padded = np.zeros(32, np.int32)
  padded[:len(sequence)] = sequence
  return np.asarray(_reference_logits(params(), jnp.asarray(padded), 32))[:len(sequence)]


@functools.lru_cache(maxsize=None)
def greedy_batch():
  return generate(params(), CFG, prompts(), PROMPT_LENGTHS, NEW, key=None, prefill_chunk=4)


def test_greedy_equals_the_no_cache_argmax_loop():
  out = greedy_batch()
  assert out["tokens"].shape == (3, NEW) and out["tokens"].dtype == jnp.int32
  np.testing.assert_array_equal(out["lengths"], NEW)
  for b, n in enumerate(PROMPT_LENGTHS):
    sequence = list(prompts()[b, :n])
    for _ in range(NEW):
      sequence.append(int(np.argmax(reference_logits(sequence)[-1])))
    np.testing.assert_array_equal(np.asarray(out["tokens"][b]), sequence[n:], err_msg=f"sequence {b}")
  assert len(set(np.asarray(out["tokens"]).ravel().tolist())) > 5   # not a degenerate repetition


def test_batch_of_different_lengths_equals_each_prompt_alone():
  batched = greedy_batch()["tokens"]
  for b, n in enumerate(PROMPT_LENGTHS):
    alone = generate(params(), CFG, prompts()[b:b + 1, :n], PROMPT_LENGTHS[b:b + 1], NEW, key=None)
    np.testing.assert_array_equal(alone["tokens"][0], batched[b], err_msg=f"sequence {b}")


def test_prefill_chunk_size_does_not_change_the_result():
  whole = generate(params(), CFG, prompts(), PROMPT_LENGTHS, NEW, key=None)
  np.testing.assert_array_equal(whole["tokens"], greedy_batch()["tokens"])


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.5)])
def test_sampled_tokens_respect_top_k_and_top_p(top_k, top_p):
  out = generate(params(), CFG, prompts(), PROMPT_LENGTHS, NEW, key=jax.random.key(4), temperature=1.5,
                 top_k=top_k, top_p=top_p)
  greedy = greedy_batch()["tokens"]
  assert not np.array_equal(out["tokens"], greedy)     # it does sample
  for b, n in enumerate(PROMPT_LENGTHS):
    sequence = list(prompts()[b, :n]) + np.asarray(out["tokens"][b]).tolist()
    logits = reference_logits(sequence)[n - 1:-1] / 1.5        # the logits each new token was drawn from
    for step, tok in enumerate(sequence[n:]):
      order = np.argsort(-logits[step])
      if top_k is not None:
        allowed = order[:top_k]
      else:
        probs = np.exp(logits[step] - logits[step].max())
        probs /= probs.sum()
        mass_above = np.cumsum(probs[order]) - probs[order]
        allowed = order[mass_above < top_p]
      assert tok in allowed, (b, step, tok, allowed)


def test_sampling_follows_the_filtered_distribution():
  logits = jax.random.normal(jax.random.key(5), (1, 12)) * 2
  draws = jax.vmap(lambda k: sampling.sample_logits(logits, k, temperature=1.0, top_k=4))(
      jax.random.split(jax.random.key(6), 4000))[:, 0]
  top4 = np.argsort(-np.asarray(logits[0]))[:4]
  probs = np.asarray(jax.nn.softmax(logits[0, top4]))
  freqs = np.array([(np.asarray(draws) == t).mean() for t in top4])
  assert freqs.sum() == 1.0
  np.testing.assert_allclose(freqs, probs, atol=0.03)
  # top_p keeps the smallest prefix whose probability reaches p.
  filtered = np.asarray(sampling.filter_top_p(logits, 0.7)[0])
  order = np.argsort(-np.asarray(logits[0]))
  p = np.asarray(jax.nn.softmax(logits[0]))[order]
  n_keep = int(np.argmax(np.cumsum(p) >= 0.7)) + 1
  assert np.isfinite(filtered[order[:n_keep]]).all() and np.isneginf(filtered[order[n_keep:]]).all()


def test_stop_tokens_end_each_sequence():
  free = np.asarray(greedy_batch()["tokens"])
  stop = int(free[0, 3])
  out = generate(params(), CFG, prompts(), PROMPT_LENGTHS, NEW, key=None, prefill_chunk=4, stop_tokens=(stop,),
                 pad_id=CFG.vocab_size - 1)
  for b in range(3):
    hits = np.flatnonzero(free[b] == stop)
    n = hits[0] + 1 if len(hits) else NEW
    assert int(out["lengths"][b]) == n
    np.testing.assert_array_equal(out["tokens"][b, :n], free[b, :n])
    assert (np.asarray(out["tokens"][b, n:]) == CFG.vocab_size - 1).all()
  # The loop stops once every sequence has: with all first tokens as stops, after one step.
  firsts = tuple(int(t) for t in free[:, 0])
  early = generate(params(), CFG, prompts(), PROMPT_LENGTHS, NEW, key=None, prefill_chunk=4, stop_tokens=firsts,
                   pad_id=CFG.vocab_size - 1)
  assert int(early["steps"]) == 1 and (np.asarray(early["lengths"]) == 1).all()
  assert int(greedy_batch()["steps"]) == NEW


def test_caller_built_caches():
  caches = llama.init_caches(CFG, 3, capacity=24)
  out = generate(params(), CFG, prompts(), PROMPT_LENGTHS, NEW, key=None, prefill_chunk=4, caches=caches)
  np.testing.assert_array_equal(out["tokens"], greedy_batch()["tokens"])
  with pytest.raises(ValueError, match=r"capacity=16 is too small"):
    generate(params(), CFG, prompts(), PROMPT_LENGTHS, NEW, key=None, caches=llama.init_caches(CFG, 3, 16))


def test_caches_built_from_the_model_config():
  from lcjax.cache import CacheConfig, make_caches
  cfg = dataclasses.replace(CFG, sliding_window=None)   # non-dense policies do not apply a sliding window
  dense = generate(params(), cfg, prompts(), PROMPT_LENGTHS, NEW, key=None, prefill_chunk=4)["tokens"]
  lossless = dataclasses.replace(cfg, cache=CacheConfig(policy="streaming", budget=64, sinks=2))
  np.testing.assert_array_equal(generate(params(), lossless, prompts(), PROMPT_LENGTHS, NEW, key=None,
                                         prefill_chunk=4)["tokens"], dense)
  # A compressing policy with per-layer budgets: the caches generate builds are make_caches' own
  # (max_chunk set to the prefill chunk), and the config's max_chunk=1 does not get in the way.
  h2o = CacheConfig(policy="h2o", layer_budgets=(4, 6), window=2)
  got = generate(params(), dataclasses.replace(cfg, cache=h2o), prompts(), PROMPT_LENGTHS, NEW, key=None,
                 prefill_chunk=4, return_caches=True)
  assert [c.budgets for c in got["caches"]] == [(4, 4), (6, 6)]
  caches = make_caches(dataclasses.replace(h2o, max_chunk=4), num_layers=2, kv_heads=2, head_dim=8, batch=3,
                       capacity=19)
  want = generate(params(), cfg, prompts(), PROMPT_LENGTHS, NEW, key=None, prefill_chunk=4, caches=caches)
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  assert (np.asarray(got["tokens"]) != np.asarray(dense)).any()      # budgets below the prompt: lossy


def test_bad_arguments_are_rejected():
  p, toks = params(), prompts()
  with pytest.raises(ValueError, match=r"capacity=12 is too small.*needs 19"):
    generate(p, CFG, toks, PROMPT_LENGTHS, NEW, key=None, capacity=12)
  with pytest.raises(ValueError, match=r"prompt_lengths=\[0, 4, 7\]"):
    generate(p, CFG, toks, np.array([0, 4, 7]), NEW, key=None)
  with pytest.raises(ValueError, match="top_k=0"):
    generate(p, CFG, toks, PROMPT_LENGTHS, NEW, key=jax.random.key(0), temperature=1.0, top_k=0)
  with pytest.raises(ValueError, match="top_p=1.5"):
    generate(p, CFG, toks, PROMPT_LENGTHS, NEW, key=jax.random.key(0), temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="key=None"):
    generate(p, CFG, toks, PROMPT_LENGTHS, NEW, key=None, temperature=1.0)
  with pytest.raises(ValueError, match=r"stop_tokens contains \[61\]"):
    generate(p, CFG, toks, PROMPT_LENGTHS, NEW, key=None, stop_tokens=(61,))
  with pytest.raises(ValueError, match="prefill_chunk=0"):
    generate(p, CFG, toks, PROMPT_LENGTHS, NEW, key=None, prefill_chunk=0)


def test_bfloat16_generation_runs():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  out = generate(params(), cfg, prompts(), PROMPT_LENGTHS, 4, key=None, prefill_chunk=4)
  assert out["tokens"].shape == (3, 4) and (np.asarray(out["tokens"]) < CFG.vocab_size).all()
