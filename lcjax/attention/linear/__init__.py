"""Kernelized / linear attention (flash-linear-attention's family layout).

  feature_maps.py  phi: FAVOR+ (orthogonal random features), elu+1, ReLU, cosFormer, NaLaFormer
  naive.py         quadratic references (the test oracles)
  noncausal.py     bidirectional O(T)
  chunk.py         causal, Lightning-style intra-chunk quadratic + inter-chunk state
  recurrent.py     constant-size decoding state: init_state / recurrent_step
  rpe_fft.py       kernelized attention with relative positions via FFT Toeplitz, O(T log T)

Typical use:  phi_q, phi_k = elu_plus_one(q), elu_plus_one(k)
              out = chunk_linear_attention(phi_q, phi_k, v, chunk_size=64)
"""
from lcjax.attention.linear.chunk import chunk_linear_attention
from lcjax.attention.linear.feature_maps import (cosformer, elu_plus_one, favor_plus, norm_aware,
                                                 orthogonal_random_features, relu)
from lcjax.attention.linear.naive import naive_linear_attention, naive_rpe_linear_attention
from lcjax.attention.linear.noncausal import noncausal_linear_attention
from lcjax.attention.linear.recurrent import (LinearAttentionState, init_state,
                                              recurrent_linear_attention, recurrent_step)
from lcjax.attention.linear.rpe_fft import rpe_linear_attention, toeplitz_matmul
