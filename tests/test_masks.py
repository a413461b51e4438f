"""Masks: each one against its definition written out in NumPy, combinators, validation."""
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import masks

Q = np.arange(-3, 40)[:, None]      # absolute positions, negatives included (q_offset < 0)
K = np.arange(0, 45)[None, :]

DEFINITIONS = [
    (masks.full(), np.ones((Q.size, K.size), bool)),
    (masks.causal(), K <= Q),
    (masks.sliding_window(3), (K <= Q) & (K >= Q - 3)),
    (masks.sliding_window(2, 5), (K >= Q - 2) & (K <= Q + 5)),
    (masks.sinks(4), np.broadcast_to(K < 4, (Q.size, K.size))),
    (masks.chunked(7), Q // 7 == K // 7),
    (masks.prefix_lm(6), (K <= Q) | (K < 6)),
    (masks.strided(4), (Q - K) % 4 == 0),
    (masks.dilated_window(3, 2), (K <= Q) & (K >= Q - 4) & ((Q - K) % 2 == 0)),
    (masks.sinks(2) | masks.sliding_window(4), (K < 2) | ((K <= Q) & (K >= Q - 4))),
    (masks.chunked(8) & masks.causal(), (Q // 8 == K // 8) & (K <= Q)),
    (~masks.causal(), K > Q),
]


@pytest.mark.parametrize("mask,expected", DEFINITIONS, ids=[repr(m) for m, _ in DEFINITIONS])
def test_mask_matches_definition_on_numpy_and_jnp(mask, expected):
  host = np.broadcast_to(np.asarray(mask(Q, K)), expected.shape)
  np.testing.assert_array_equal(host, expected)
  device = jnp.broadcast_to(mask(jnp.asarray(Q), jnp.asarray(K)), expected.shape)
  np.testing.assert_array_equal(np.asarray(device), expected)
  assert isinstance(mask(Q, K), np.ndarray)          # host evaluation stays on the host


def test_masks_are_hashable_and_compare_by_value():
  a = masks.sinks(4) | masks.sliding_window(16)
  b = masks.sinks(4) | masks.sliding_window(16)
  assert a == b and hash(a) == hash(b)
  assert a != masks.sinks(4) | masks.sliding_window(15)


@pytest.mark.parametrize("make,arg", [(masks.sinks, -1), (masks.chunked, 0), (masks.strided, 0),
                                      (masks.prefix_lm, -2), (masks.chunked, 2.5)])
def test_bad_parameters_are_named(make, arg):
  with pytest.raises(ValueError, match="accepted"):
    make(arg)


def test_sliding_window_rejects_negative():
  with pytest.raises(ValueError, match="left >= 0"):
    masks.sliding_window(-1)
