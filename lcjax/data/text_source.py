"""A random-access source of byte tokens over a source of text records (catalog datasets).

TFDS catalog datasets such as pg19 hold text under their own feature name ("book_text"); the
lcjax pipeline reads "tokens". ByteTokenizedSource gives every record a "tokens" field, the
UTF-8 bytes of record[text_key] (uint8 [num_bytes]), keeping the other fields.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class ByteTokenizedSource(Sequence):
  """source[i] with "tokens" = the bytes of source[i][text_key]; len and indexing as source."""

  def __init__(self, source: Sequence[dict], text_key: str):
    if not isinstance(text_key, str) or not text_key:
      raise ValueError(f"text_key={text_key!r} is invalid; accepted: a feature name (str)")
    self._source = source
    self._text_key = text_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = dict(self._source[index])
    if self._text_key not in record:
      raise ValueError(f"text_key={self._text_key!r} is not a field of the records; accepted: "
                       f"one of {sorted(record)}")
    text = record[self._text_key]
    if isinstance(text, str):
      text = text.encode("utf-8")
    record["tokens"] = np.frombuffer(bytes(text), dtype=np.uint8)
    return record

  def __repr__(self) -> str:
    return f"ByteTokenizedSource({self._source!r}, text_key={self._text_key!r})"
