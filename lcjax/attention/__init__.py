"""Attention: masks -> block layouts, selectors, references, and attend()."""
from lcjax.attention.api import attend
from lcjax.attention.layout import BlockLayout
from lcjax.attention import masks
from lcjax.attention import score_mods
from lcjax.attention.layouts import to_layout
from lcjax.attention.reference import attention_reference
from lcjax.attention import fidelity, selectors
