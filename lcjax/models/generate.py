"""generate(): chunked prefill, then a lax.while_loop decode, all under one jit.

Prompts are right-padded [B, P] with per-sequence lengths. Prefill runs P (rounded up to the
chunk) tokens through the model in chunks of `prefill_chunk`, telling the caches how many tokens of
each chunk are real (`num_new`); the padding written past a sequence's length is overwritten by
its decoded tokens. Decoding feeds one token per sequence per step, at position prompt_length +
step, until every sequence has produced a stop token or max_new_tokens.

With DynamicNTKScaling the RoPE base depends on the longest position in each forward call (as in
transformers), so results then depend on the batch's longest prompt and on the prefill chunking.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.models import llama
from lcjax.models.config import ModelConfig
from lcjax.models.sampling import sample_logits, validate_sampling


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def required_capacity(prompt_len: int, max_new_tokens: int, prefill_chunk: int) -> int:
  """Cache slots generate needs: the prompt plus new tokens, and whole prefill chunks."""
  return max(_round_up(prompt_len, prefill_chunk), prompt_len + max_new_tokens)


def _prefill(params, tokens, lengths, caches, *, cfg: ModelConfig, chunk: int):
  """Runs the padded prompt [B, n * chunk] through the caches; returns (logits [B, V] of each
  sequence's last prompt token, caches)."""
  batch, padded_len = tokens.shape

  def step(carry, start):
    caches, last_h = carry
    toks = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
    offsets = start + jnp.arange(chunk, dtype=jnp.int32)
    num_new = jnp.clip(lengths - start, 0, chunk)
    # Padding gets position 0, so it cannot move a dynamic RoPE scaling's sequence length.
    positions = jnp.where(offsets[None, :] < lengths[:, None], offsets[None, :], 0)
    h, caches = llama.forward_hidden(params, toks, positions, caches, cfg=cfg, num_new=num_new)
    last = lengths - 1 - start                               # index of the last prompt token here
    h_last = jnp.take_along_axis(h, jnp.clip(last, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
    last_h = jnp.where(((last >= 0) & (last < chunk))[:, None], h_last, last_h)
    return (caches, last_h), None

  starts = jnp.arange(0, padded_len, chunk, dtype=jnp.int32)
  last_h = jnp.zeros((batch, cfg.dim), cfg.compute_dtype)
  (caches, last_h), _ = jax.lax.scan(step, (caches, last_h), starts)
  return llama.logits_from_hidden(params, last_h[:, None], cfg)[:, 0], caches


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "chunk", "capacity", "temperature",
                                             "top_k", "top_p", "stop_tokens", "pad_id", "cache_dtype"))
def _generate(params, prompt_tokens, prompt_lengths, key, caches, *, cfg, max_new_tokens, chunk, capacity,
              temperature, top_k, top_p, stop_tokens, pad_id, cache_dtype):
  batch, prompt_len = prompt_tokens.shape
  padded = jnp.full((batch, _round_up(prompt_len, chunk)), pad_id, jnp.int32).at[:, :prompt_len].set(prompt_tokens)
  if caches is None:
    caches = llama.init_caches(cfg, batch, capacity, cache_dtype)
  logits, caches = _prefill(params, padded, prompt_lengths, caches, cfg=cfg, chunk=chunk)
  stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

  def cond(state):
    step, _, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, caches, logits, out, done, n_out, key = state
    key, sub = jax.random.split(key)
    tok = sample_logits(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], step, axis=1)
    n_out = n_out + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, stops)
    positions = (prompt_lengths + step)[:, None]
    h, caches = llama.forward_hidden(params, tok[:, None], positions, caches, cfg=cfg)
    logits = llama.logits_from_hidden(params, h, cfg)[:, 0]
    return step + 1, caches, logits, out, done, n_out, key

  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  state = (jnp.int32(0), caches, logits, out, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32), key)
  steps, _, _, out, _, n_out, _ = jax.lax.while_loop(cond, body, state)
  return {"tokens": out, "lengths": n_out, "steps": steps}


def generate(params, cfg: ModelConfig, prompt_tokens, prompt_lengths, max_new_tokens: int, *, key,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens=(), prefill_chunk: int | None = None, capacity: int | None = None,
             pad_id: int = 0, cache_dtype=None, caches=None):
  """Samples continuations of right-padded prompts.

  Args:
    params, cfg: the model.
    prompt_tokens: int32 [B, P], sequence b's prompt in its first prompt_lengths[b] entries.
    prompt_lengths: int32 [B], each in [1, P].
    max_new_tokens: tokens to generate per sequence (at most).
    key: a jax.random key (may be None when temperature == 0).
    temperature: 0 is greedy; otherwise the softmax temperature.
    top_k, top_p: None or the top-k / nucleus restriction applied before sampling.
    stop_tokens: token ids that end a sequence (the stop token is kept in the output).
    prefill_chunk: prefill chunk size; None prefills the whole prompt at once.
    capacity: cache slots; None means `required_capacity(P, max_new_tokens, prefill_chunk)`.
    pad_id: written after a sequence stops (and used to pad the prompt to whole chunks).
    cache_dtype: the caches' dtype, default cfg.dtype.
    caches: None (DenseKVCache per layer, from llama.init_caches) or empty caches of batch B,
      one per layer, of any lcjax.cache type (e.g. lcjax.cache.factory.make_caches); those with a
      `capacity` attribute are checked against what generate needs.
  Returns:
    {"tokens": int32 [B, max_new_tokens] (pad_id after a stop), "lengths": int32 [B] tokens
    generated, stop included, "steps": int32 [] decode steps run (fewer than max_new_tokens
    when every sequence stopped early)}.
  """
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  if prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must be int32 [batch, prompt_len]; got shape {prompt_tokens.shape}")
  batch, prompt_len = prompt_tokens.shape
  if prompt_lengths.shape != (batch,):
    raise ValueError(f"prompt_lengths must be int32 [{batch}]; got shape {prompt_lengths.shape}")
  try:
    lengths = np.asarray(prompt_lengths)
  except jax.errors.ConcretizationTypeError:
    lengths = None   # traced by an outer jit: cannot be checked here
  if lengths is not None and (lengths.min() < 1 or lengths.max() > prompt_len):
    raise ValueError(f"prompt_lengths={lengths.tolist()}; accepted: values in [1, prompt_len={prompt_len}]")
  if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
    raise ValueError(f"max_new_tokens={max_new_tokens!r}; accepted: an int >= 1")
  chunk = prompt_len if prefill_chunk is None else prefill_chunk
  if not (isinstance(chunk, int) and chunk >= 1):
    raise ValueError(f"prefill_chunk={prefill_chunk!r}; accepted: None or an int >= 1")
  needed = required_capacity(prompt_len, max_new_tokens, chunk)
  if caches is not None:
    if capacity is not None:
      raise ValueError("pass either capacity (generate builds the caches) or caches, not both")
    if len(caches) != cfg.n_layers:
      raise ValueError(f"caches has {len(caches)} entries; accepted: one per layer ({cfg.n_layers})")
    capacities = [c.capacity for c in caches if isinstance(getattr(c, "capacity", None), int)]
    capacity = min(capacities) if capacities else None
  else:
    capacity = needed if capacity is None else capacity
  if capacity is not None and capacity < needed:
    raise ValueError(f"capacity={capacity} is too small: prompt_len={prompt_len} + max_new_tokens={max_new_tokens} "
                     f"with prefill_chunk={chunk} needs {needed} cache slots")
  validate_sampling(temperature, top_k, top_p, cfg.vocab_size)
  stop_tokens = tuple(int(t) for t in stop_tokens)
  bad = [t for t in stop_tokens if not 0 <= t < cfg.vocab_size]
  if bad:
    raise ValueError(f"stop_tokens contains {bad}; accepted: ids in [0, vocab_size={cfg.vocab_size})")
  if key is None:
    if temperature != 0:
      raise ValueError("key=None; accepted: a jax.random key (sampling with temperature > 0 needs one)")
    key = jax.random.key(0)
  cache_dtype = None if cache_dtype is None else jnp.dtype(cache_dtype).name
  return _generate(params, prompt_tokens, prompt_lengths, key, caches, cfg=cfg, max_new_tokens=max_new_tokens,
                   chunk=chunk, capacity=capacity, temperature=float(temperature), top_k=top_k,
                   top_p=None if top_p is None else float(top_p), stop_tokens=stop_tokens, pad_id=int(pad_id),
                   cache_dtype=cache_dtype)
