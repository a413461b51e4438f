"""Quickstart: a small byte-level Llama learns passkey retrieval on a 2-core CPU in minutes.

    python -m experiments.quickstart --config configs/quickstart.py [--config.train.num_steps=...]

The task: 128-256 bytes of repeating filler with "The pass key is 4821. Remember it. ..." at a
random depth, ending "What is the pass key? The pass key is 4821" (4 digits: chance 1/9000).
Two layers are the least that can retrieve: a previous-token head in layer 1 lets a layer-2 head
find "key is " earlier in the context and copy what followed it (an induction circuit). The loss
is on every token, so the model also learns to copy the repeating filler, which grows the same
circuit. Measured on this configuration (800 steps): see the README's quickstart numbers.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # cache: the KV cache generate() builds (lcjax.cache.CacheConfig), e.g.
  # --config.model.cache.policy=snapkv --config.model.cache.budget=64; cla_share: cross-layer attention.
  c.model = dict(vocab_size=384, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=512,
                 max_seq_len=256, rope_theta=10000.0, dtype="float32", param_dtype="float32", cla_share=1,
                 cache=dict(policy="dense", budget=256, window=32, sinks=4))
  c.data = dict(task="passkey", seq_len=256, batch_size=16, seed=0, pack=False, loss_on="all",
                data_dir=placeholder(str),
                options=dict(lengths=(128, 192, 256), digits=4, num_train=20000, num_validation=16,
                             num_test=16, seed=0))
  c.optimizer = dict(learning_rate=1e-3, warmup_steps=100, decay_steps=placeholder(int), min_lr_ratio=0.1,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip_norm=1.0, grad_accum_steps=1)
  c.train = dict(num_steps=800, work_dir="runs/quickstart", seed=0, log_every=25,
                 checkpoint_every=400, keep_checkpoints=2, async_checkpointing=True, eval_every=0,
                 progress_bar=True)
  c.eval = dict(tasks=("passkey",), lengths=(128, 192, 256), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                examples_per_cell=16, batch_size=16, method="teacher_forced",
                perplexity_task="python_stdlib", perplexity_examples=32, position_buckets=8,
                seed=1234, task_options={})
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  return c
