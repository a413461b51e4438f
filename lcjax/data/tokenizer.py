"""Byte-level tokenizer: token ids 0..255 are the bytes themselves, then three special tokens.

    id 0..255  the byte values (UTF-8 text, or any binary content)
    id 256     BOS  (begin of sequence; the pipeline puts it in front of every example)
    id 257     EOS  (end of document; optional, see lcjax.data.pipeline)
    id 258     PAD  (filler of padded positions; their segment id is 0 and their loss mask 0)

VOCAB_SIZE (259) counts the ids in use. Models should use an embedding of at least
PADDED_VOCAB_SIZE (384 = 3 x 128) rows: a multiple of 128 keeps the logits matmul and its
sharding over the vocabulary evenly tiled on GPUs and TPUs; rows 259..383 are never targets.
PAD is not 0 because byte 0 is a legal token (binary files, MQAR keys).
"""

from __future__ import annotations

import numpy as np

NUM_BYTES = 256
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259
PADDED_VOCAB_SIZE = 384


def encode(text: str | bytes) -> np.ndarray:
  """Returns the byte ids of `text` (str is UTF-8 encoded) as int32 [len(bytes)]; no BOS/EOS."""
  if isinstance(text, str):
    text = text.encode("utf-8")
  if not isinstance(text, (bytes, bytearray)):
    raise ValueError(f"text={text!r} has type {type(text).__name__}; accepted: str or bytes")
  return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)


def decode_bytes(ids) -> bytes:
  """Returns the bytes of the byte ids in `ids` (int array-like); special ids are dropped."""
  ids = np.asarray(ids).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"ids contain values outside [0, {VOCAB_SIZE}): min {ids.min()}, "
                     f"max {ids.max()}; accepted: byte ids 0..255 and special ids 256..258")
  return ids[ids < NUM_BYTES].astype(np.uint8).tobytes()


def decode(ids, errors: str = "replace") -> str:
  """Returns the UTF-8 text of the byte ids in `ids`; special ids are dropped.

  errors: how undecodable bytes are handled, as in bytes.decode ("replace" by default, since a
  model may emit any byte sequence).
  """
  return decode_bytes(ids).decode("utf-8", errors=errors)
