"""Writes colab/quickstart.ipynb from the cells below (keeps the notebook reviewable as code).

    .venv/bin/python scripts/make_notebook.py
"""
import json
import os

CELLS = [
    ("markdown", """# lcjax quickstart

Trains a small byte-level Llama on passkey retrieval, evaluates it by context length and needle
depth, then looks at the same model through lcjax's attention API: masks compiled into block
layouts, a dynamic sparsity selector, and a compressed KV cache.

On Colab: `Runtime -> Change runtime type -> GPU` is optional; everything here runs on a CPU."""),
    ("code", """# On Colab, clone the repository and install it (skip when running from a checkout).
import os, sys
if 'google.colab' in sys.modules and not os.path.exists('lcjax'):
    !git clone https://github.com/lcjax/lcjax.git lcjax_repo
    %cd lcjax_repo
    !pip install -q -c constraints.txt -e .
"""),
    ("code", """import importlib.util, os
import jax, jax.numpy as jnp, numpy as np
from lcjax.config import parse_config
from lcjax.train import train
from lcjax.eval import format_results

spec = importlib.util.spec_from_file_location('qs', 'configs/quickstart.py')
qs = importlib.util.module_from_spec(spec); spec.loader.exec_module(qs)
config = qs.get_config()
config.train.work_dir = 'runs/notebook'
config.train.num_steps = int(os.environ.get('LCJAX_NOTEBOOK_STEPS', config.train.num_steps))
config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, config.train.num_steps // 4)
cfg = parse_config(config)   # typed, validated: a bad key fails here with its path
print(cfg.model)"""),
    ("code", """result = train(cfg)   # resumes from runs/notebook/checkpoints if it exists
print(format_results(result.eval_results))"""),
    ("code", """from IPython.display import Image, display
display(Image(os.path.join(cfg.train.work_dir, 'eval', 'eval.png')))"""),
    ("markdown", """## Select, then attend

A mask is a function of absolute indices; `to_layout` compiles it into a `BlockLayout` (the key
blocks each query block visits); a selector builds a layout from the data; `attend` runs exact
attention over it."""),
    ("code", """from lcjax.attention import attend, masks, to_layout, selectors, fidelity
T, H, D = 512, 4, 32
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (1, T, H, D)); k = jax.random.normal(kk, (1, T, H, D)); v = jax.random.normal(kv, (1, T, H, D))
streaming = masks.sinks(4) | masks.sliding_window(63)
layout = to_layout(masks.causal() & streaming, T, T, 64, 64)
out = attend(q, k, v, mask=masks.causal() & streaming, layout=layout)
print('density of the StreamingLLM layout:', float(layout.density().mean()))
dense = attend(q, k, v, mask=masks.causal())
print('relative difference to dense causal:', float(jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense)))"""),
    ("code", """import matplotlib.pyplot as plt
visible, full = layout.block_mask()
plt.imshow(np.asarray(visible[0, 0]).astype(int) + np.asarray(full[0, 0]).astype(int), cmap='Blues')
plt.title('visited key blocks (dark: fully visible)'); plt.xlabel('key block'); plt.ylabel('query block'); plt.show()"""),
    ("code", """# A dynamic selector: top-k key blocks from pooled q . k, then exact attention over them.
layout = selectors.block_topk.select(q, k, budget=2, block_q=64, block_kv=64)
print(fidelity.evaluate(q, k, v, layout, mask=masks.causal()))"""),
    ("markdown", """## KV caches

One config line swaps the cache policy; every cache reports the bytes it holds.
`python -m experiments.evaluate_caches --config configs/evaluate_caches.py` runs every policy
at several budgets on the trained model."""),
    ("code", """from lcjax.cache.config import CacheConfig
from lcjax.cache.factory import make_caches
m = cfg.model
for policy in ('dense', 'streaming', 'h2o', 'kivi'):
    caches = make_caches(CacheConfig(policy=policy, budget=64), num_layers=m.n_layers, kv_heads=m.n_kv_heads,
                         head_dim=m.head_dim, batch=1, capacity=1024)
    print(f"{policy:10s} {sum(c.memory_bytes() for c in caches if c is not None):>10,d} bytes")"""),
]


def main():
  nb = {"nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"},
                     "language_info": {"name": "python"}},
        "cells": []}
  for i, (kind, src) in enumerate(CELLS):
    cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {}, "source": src.splitlines(keepends=True)}
    if kind == "code":
      cell.update(outputs=[], execution_count=None)
    nb["cells"].append(cell)
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab", "quickstart.ipynb")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(nb, f, indent=1)
  print(path)


if __name__ == "__main__":
  main()
