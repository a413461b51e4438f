"""generate(): chunked prefill, then a lax.while_loop decode, all under one jit.

Prompts are right-padded [B, P] with per-sequence lengths. Prefill runs P (rounded up to the
chunk) tokens through the model in chunks of `prefill_chunk`, telling the caches how many tokens of
each chunk are real (`num_new`); the padding written past a sequence's length is overwritten by
its decoded tokens. Decoding feeds one token per sequence per step, at position prompt_length +
step, until every sequence has produced a stop token or max_new_tokens.

Without caches from the caller, generate builds them from the model config (cfg.cache, one
CacheConfig; cfg.cla_share for cross-layer attention) with the prefill chunk as max_chunk; with
cfg.cache.policy == "minicache" it merges adjacent layers' dense caches after the prefill
(lcjax.cache.minicache.merge_adjacent_layers), and decoding reads the merged caches.

With a mesh (`generate(..., mesh=mesh)`) the whole call is one jax.jit with NamedShardings from
the logical-axis rules (lcjax.sharding): params by `param_logical_axes`, caches (given or built)
by `cache_logical_axes`, prompts and the outputs split over the batch axes, the key and the step
count replicated. It runs under `jax.set_mesh(mesh)`, so the model's activation constraints and
the caches' constraints in the decode loop apply too.

With DynamicNTKScaling the RoPE base depends on the longest position in each forward call (as in
transformers), so results then depend on the batch's longest prompt and on the prefill chunking.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.cache.base import cache_logical_axes
from lcjax.cache.minicache import merge_adjacent_layers
from lcjax.models import llama
from lcjax.models.config import ModelConfig
from lcjax.models.sampling import sample_logits, validate_sampling
from lcjax.sharding import constrain_tree, logical_sharding, logical_to_shardings, replicated


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


def _constrain_caches(caches):
  """Each cache's arrays constrained by its logical axes (identity without an active mesh)."""
  return [None if c is None else constrain_tree(c, cache_logical_axes(c)) for c in caches]


def _cache_shardings(caches, mesh):
  """NamedShardings of a list of caches (arrays or ShapeDtypeStructs) from their logical axes."""
  return [None if c is None else logical_to_shardings(cache_logical_axes(c), mesh, c) for c in caches]


def _generate_impl(params, prompt_tokens, prompt_lengths, key, caches, *, cfg, max_new_tokens, chunk, capacity,
                   temperature, top_k, top_p, stop_tokens, pad_id, cache_dtype, return_caches=False):
  """The whole of generate (prefill, then the decode loop); jitted as _generate or by _mesh_jit."""
  batch, prompt_len = prompt_tokens.shape
  padded = jnp.full((batch, _round_up(prompt_len, chunk)), pad_id, jnp.int32).at[:, :prompt_len].set(prompt_tokens)
  from_config = caches is None
  if from_config:
    caches = llama.init_caches(cfg, batch, capacity, cache_dtype, max_chunk=chunk)
  logits, caches = _prefill(params, padded, prompt_lengths, _constrain_caches(caches), cfg=cfg, chunk=chunk)
  if from_config and cfg.cache.policy == "minicache":
    c = cfg.cache
    caches = merge_adjacent_layers(caches, start_layer=c.minicache_first_layer(cfg.n_layers), t=c.minicache_t,
                                   gamma=c.minicache_gamma, max_retained=c.minicache_max_retained,
                                   tail=max_new_tokens, length=padded.shape[1])
  caches = _constrain_caches(caches)
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
    # The loop carry keeps the caches' sharding (with a mesh); otherwise a no-op.
    return step + 1, _constrain_caches(caches), logits, out, done, n_out, key

  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  state = (jnp.int32(0), caches, logits, out, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32), key)
  steps, caches, _, out, _, n_out, _ = jax.lax.while_loop(cond, body, state)
  result = {"tokens": out, "lengths": n_out, "steps": steps}
  if return_caches:
    result["caches"] = caches
  return result


_STATIC = ("cfg", "max_new_tokens", "chunk", "capacity", "temperature", "top_k", "top_p", "stop_tokens", "pad_id",
           "cache_dtype", "return_caches")
_generate = jax.jit(_generate_impl, static_argnames=_STATIC)


@functools.lru_cache(maxsize=32)
def _mesh_jit(mesh, static_items: tuple, in_flat: tuple, abstract_flat: tuple):
  """The jax.jit of _generate_impl for one mesh, static arguments and input layout, with in/out NamedShardings.

  in_flat, abstract_flat: (leaves, treedef) of the inputs' shardings and ShapeDtypeStructs
  (hashable, so that repeated calls reuse the compiled function).
  """
  fn = functools.partial(_generate_impl, **dict(static_items))
  in_shardings = jax.tree.unflatten(in_flat[1], in_flat[0])
  with jax.set_mesh(mesh):   # the outputs' structure (MiniCache's merge changes the caches' type)
    out = jax.eval_shape(fn, *jax.tree.unflatten(abstract_flat[1], abstract_flat[0]))
  out_shardings = {"tokens": logical_sharding(("batch", None), mesh, out["tokens"].shape),
                   "lengths": logical_sharding(("batch",), mesh, out["lengths"].shape), "steps": replicated(mesh)}
  if "caches" in out:
    out_shardings["caches"] = _cache_shardings(out["caches"], mesh)
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)


def _generate_on_mesh(mesh, args: tuple, static: dict):
  """_generate_impl jitted with NamedShardings on `mesh` (see the module doc); args are placed first."""
  params, tokens, lengths, _, caches = args
  in_shardings = (logical_to_shardings(llama.param_logical_axes(static["cfg"]), mesh, params),
                  logical_sharding(("batch", None), mesh, tokens.shape),
                  logical_sharding(("batch",), mesh, lengths.shape), replicated(mesh),
                  None if caches is None else _cache_shardings(caches, mesh))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  in_leaves, in_tree = jax.tree.flatten(in_shardings)
  abs_leaves, abs_tree = jax.tree.flatten(abstract)
  fn = _mesh_jit(mesh, tuple(sorted(static.items())), (tuple(in_leaves), in_tree), (tuple(abs_leaves), abs_tree))
  with jax.set_mesh(mesh):
    return fn(*jax.device_put(args, in_shardings))


def generate(params, cfg: ModelConfig, prompt_tokens, prompt_lengths, max_new_tokens: int, *, key,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens=(), prefill_chunk: int | None = None, capacity: int | None = None,
             pad_id: int = 0, cache_dtype=None, caches=None, mesh=None, return_caches: bool = False):
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
    caches: None: built from cfg.cache by llama.init_caches (cfg.cache.max_chunk replaced by the
      prefill chunk; MiniCache merged after the prefill). Or empty caches of batch B, one per
      layer (None at CLA non-owner layers), of any lcjax.cache type (e.g. lcjax.cache.make_caches),
      used as given (cfg.cache is then not read); those with a `capacity` attribute are checked
      against what generate needs.
    mesh: None, or a jax.sharding.Mesh (lcjax.sharding.make_mesh): jit with NamedShardings from
      the logical-axis rules (module doc); inputs are moved to those shardings first.
    return_caches: also return the caches after the last decode step (with a mesh, placed by
      their logical axes).
  Returns:
    {"tokens": int32 [B, max_new_tokens] (pad_id after a stop), "lengths": int32 [B] tokens
    generated, stop included, "steps": int32 [] decode steps run (fewer than max_new_tokens
    when every sequence stopped early)}, and "caches" (one per layer) with return_caches.
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
  static = dict(cfg=cfg, max_new_tokens=max_new_tokens, chunk=chunk, capacity=capacity,
                temperature=float(temperature), top_k=top_k, top_p=None if top_p is None else float(top_p),
                stop_tokens=stop_tokens, pad_id=int(pad_id), cache_dtype=cache_dtype,
                return_caches=bool(return_caches))
  args = (params, prompt_tokens, prompt_lengths, key, caches)
  if mesh is None:
    return _generate(*args, **static)
  return _generate_on_mesh(mesh, args, static)
