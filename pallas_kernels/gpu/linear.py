"""Chunked causal linear attention (Lightning / simple-GLA style), forward, backward, decode step.

    o_t = sum_{s <= t} gamma_h^(t - s) (scale q_t . k_s) v_s,      gamma_h = exp(log_decay_h) <= 1

Forward: one program per (batch, head, block of value columns) walks the chunks in order,
keeping the running state S [Dk, block_v] (float32) in registers:
    o_c = (q_c k_c^T * decay mask) v_c   (intra-chunk, quadratic, causal)
        + (gamma^(i+1) q_c) S            (inter-chunk, from everything before the chunk)
    S   = gamma^C S + (gamma^(C-1-j) k_c)^T v_c
Backward reuses the forward kernel three times (dq = LA(do, v, k); dk and dv are the same
computation on time-reversed inputs), so it is exactly as fast as three forwards. log_decay is
treated as a constant (no gradient).

Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv] (bf16, fp16 or fp32); log_decay float32 [H] or None;
the state is float32 [B, H, Dk, Dv]. T is padded to a multiple of the chunk by the wrapper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _linear_fwd_kernel(decay_ref, q_ref, k_ref, v_ref, o_ref, state_ref, *, chunk, has_decay):
  h = pl.program_id(1)
  dk = q_ref.shape[-1]
  block_v = v_ref.shape[-1]
  num_chunks = q_ref.shape[0] // chunk
  dtype = q_ref.dtype
  i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  j = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  if has_decay:
    g = decay_ref[h]
    fi = lax.broadcasted_iota(jnp.int32, (chunk,), 0).astype(jnp.float32)
    intra = jnp.where(i >= j, jnp.exp(g * jnp.maximum(i - j, 0).astype(jnp.float32)), 0.0)
    q_decay = jnp.exp(g * (fi + 1.0))
    k_decay = jnp.exp(g * (chunk - 1.0 - fi))
    chunk_decay = jnp.exp(g * chunk)

  def body(c, state):
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    q = q_ref[rows, :]
    k = k_ref[rows, :]
    v = v_ref[rows, :]
    s = plgpu.dot(q, k, trans_b=True)
    s = s * intra if has_decay else jnp.where(i >= j, s, 0.0)
    # Decays scale the small operands (rows of q S, rows of v) so that q and k go to the tensor
    # cores straight from memory.
    inter = plgpu.dot(q, state.astype(dtype))
    if has_decay:
      inter = inter * q_decay[:, None]
    o = plgpu.dot(s.astype(dtype), v) + inter
    o_ref[rows, :] = o.astype(o_ref.dtype)
    vs = (v.astype(jnp.float32) * k_decay[:, None]).astype(dtype) if has_decay else v
    update = plgpu.dot(k, vs, trans_a=True)
    return (chunk_decay * state + update) if has_decay else (state + update)

  state = lax.fori_loop(0, num_chunks, body, jnp.zeros((dk, block_v), jnp.float32))
  state_ref[...] = state


def _forward(q, k, v, log_decay, *, chunk, block_v, num_warps, num_stages, interpret):
  """Core forward on T % chunk == 0 (scale already applied): (out, final state)."""
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  has_decay = log_decay is not None
  decay = jnp.zeros((heads,), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
  kernel = functools.partial(_linear_fwd_kernel, chunk=chunk, has_decay=has_decay)
  seq = lambda d: pl.BlockSpec((None, t, None, d), lambda b, h, n: (b, 0, h, 0))
  return pl.pallas_call(
      kernel,
      grid=(batch, heads, dv // block_v),
      in_specs=[pl.BlockSpec((heads,), lambda b, h, n: (0,)), seq(dk), seq(dk),
                pl.BlockSpec((None, t, None, block_v), lambda b, h, n: (b, 0, h, n))],
      out_specs=[pl.BlockSpec((None, t, None, block_v), lambda b, h, n: (b, 0, h, n)),
                 pl.BlockSpec((None, None, dk, block_v), lambda b, h, n: (b, h, 0, n))],
      out_shape=[jax.ShapeDtypeStruct((batch, t, heads, dv), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="lcjax_linear_attention_fwd",
  )(decay, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear_attention_core(q, k, v, log_decay, opts):
  return _forward(q, k, v, log_decay, **dict(opts))[0]


def _core_fwd(q, k, v, log_decay, opts):
  return _linear_attention_core(q, k, v, log_decay, opts), (q, k, v, log_decay)


def _core_bwd(opts, res, do):
  q, k, v, log_decay = res
  fwd = lambda a, b, c: _forward(a, b, c, log_decay, **dict(opts))[0]
  rev = lambda x: jnp.flip(x, axis=1)
  do = do.astype(q.dtype)
  dq = fwd(do, v, k)                              # sum_{s<=t} g^(t-s) (do_t . v_s) k_s
  dk = rev(fwd(rev(v), rev(do), rev(q)))          # sum_{t>=s} g^(t-s) (v_s . do_t) q_t
  dv = rev(fwd(rev(k), rev(q), rev(do)))          # sum_{t>=s} g^(t-s) (k_s . q_t) do_t
  d_decay = None if log_decay is None else jnp.zeros_like(log_decay)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), d_decay


_linear_attention_core.defvjp(_core_fwd, _core_bwd)


def _validate(q, k, v, log_decay, chunk, block_v):
  if q.ndim != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k must be [B, T, H, Dk] and v [B, T, H, Dv]; got q{q.shape}, k{k.shape}, v{v.shape}")
  if q.shape[-1] % 16 or v.shape[-1] % block_v or block_v % 16:
    raise ValueError(f"Dk={q.shape[-1]} must be a multiple of 16 and block_v={block_v} a multiple of "
                     f"16 dividing Dv={v.shape[-1]}")
  if chunk < 16 or chunk & (chunk - 1):
    raise ValueError(f"chunk_size must be a power of two >= 16; got {chunk}")
  if log_decay is not None and jnp.shape(log_decay) != (q.shape[2],):
    raise ValueError(f"log_decay must be float32 [H={q.shape[2]}]; got shape {jnp.shape(log_decay)}")


def _pad_time(x, chunk):
  pad = -x.shape[1] % chunk
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


@functools.partial(jax.jit, static_argnames=(
    "scale", "chunk_size", "block_v", "num_warps", "num_stages", "interpret", "return_state"))
def linear_attention(q, k, v, log_decay=None, *, scale: float | None = None, chunk_size: int = 64,
                     block_v: int = 64, num_warps: int = 4, num_stages: int = 2,
                     interpret: bool = False, return_state: bool = False):
  """Causal linear attention, differentiable in q, k, v (not in log_decay).

  Args:
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay: float32 [H] (<= 0) or None.
    scale: multiplies q; default Dk ** -0.5.
    chunk_size: tokens per chunk (a power of two >= 16); block_v: value columns per program.
  Returns:
    out [B, T, H, Dv] in q.dtype; with return_state also the float32 state [B, H, Dk, Dv]
    after the last token (for linear_attention_decode_step; not differentiated).
  """
  block_v = min(block_v, v.shape[-1])
  _validate(q, k, v, log_decay, chunk_size, block_v)
  t = q.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
  qs, kp, vp = (_pad_time(x, chunk_size) for x in (qs, k, v))
  opts = (("chunk", chunk_size), ("block_v", block_v), ("num_warps", num_warps),
          ("num_stages", num_stages), ("interpret", interpret))
  if log_decay is not None:
    log_decay = lax.stop_gradient(jnp.asarray(log_decay, jnp.float32))
  if return_state:
    # Zero-padded keys past T add nothing to the state, but decay would age it: recompute the
    # decay of padding by scaling back (exactly, gamma^pad) so the state is the one after token T.
    out, state = _forward(qs, kp, vp, log_decay, **dict(opts))
    pad = kp.shape[1] - t
    if log_decay is not None and pad:
      state = state * jnp.exp(-log_decay * pad)[None, :, None, None]
    return out[:, :t], state
  return _linear_attention_core(qs, kp, vp, log_decay, opts)[:, :t]


def _decode_step_kernel(decay_ref, q_ref, k_ref, v_ref, s_ref, o_ref, s_out_ref, *, scale, has_decay):
  h = pl.program_id(1)
  state = s_ref[...]                                           # [Dk, block_v] float32
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  q = q_ref[...].astype(jnp.float32) * scale
  if has_decay:
    state = jnp.exp(decay_ref[h]) * state
  state = state + k[:, None] * v[None, :]
  o_ref[...] = jnp.sum(q[:, None] * state, axis=0).astype(o_ref.dtype)
  s_out_ref[...] = state


@functools.partial(jax.jit, static_argnames=("scale", "block_v", "num_warps", "interpret"))
def linear_attention_decode_step(state, q, k, v, log_decay=None, *, scale: float | None = None,
                                 block_v: int = 32, num_warps: int = 4, interpret: bool = False):
  """One recurrent step: S <- gamma S + k^T v; o = scale q S.

  Args:
    state: float32 [B, H, Dk, Dv]; q, k: [B, H, Dk]; v: [B, H, Dv]; log_decay float32 [H] or None.
  Returns:
    (out [B, H, Dv] in q.dtype, new state float32 [B, H, Dk, Dv]); the state buffer is updated
    in place when the caller donates it.
  """
  batch, heads, dk = q.shape
  dv = v.shape[-1]
  block_v = min(block_v, dv)
  if state.shape != (batch, heads, dk, dv) or k.shape != q.shape or dv % block_v:
    raise ValueError(f"state must be [B, H, Dk, Dv] = {(batch, heads, dk, dv)} with k{q.shape} and "
                     f"block_v={block_v} dividing Dv; got state{state.shape}, k{k.shape}")
  scale = dk ** -0.5 if scale is None else scale
  has_decay = log_decay is not None
  decay = jnp.zeros((heads,), jnp.float32) if log_decay is None else jnp.asarray(log_decay, jnp.float32)
  vec = lambda d: pl.BlockSpec((None, None, d), lambda b, h, n: (b, h, 0))
  vblk = pl.BlockSpec((None, None, block_v), lambda b, h, n: (b, h, n))
  sblk = pl.BlockSpec((None, None, dk, block_v), lambda b, h, n: (b, h, 0, n))
  return pl.pallas_call(
      functools.partial(_decode_step_kernel, scale=scale, has_decay=has_decay),
      grid=(batch, heads, dv // block_v),
      in_specs=[pl.BlockSpec((heads,), lambda b, h, n: (0,)), vec(dk), vec(dk), vblk, sblk],
      out_specs=[vblk, sblk],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, dv), q.dtype),
                 jax.ShapeDtypeStruct(state.shape, jnp.float32)],
      input_output_aliases={4: 1},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps),
      interpret=interpret,
      name="lcjax_linear_attention_decode_step",
  )(decay, q, k, v, state.astype(jnp.float32))
