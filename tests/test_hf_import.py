"""Hugging Face import: parity with transformers through golden fixtures (scripts/make_hf_fixtures.py)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lcjax.models import hf_import, llama, rope
from lcjax.models.generate import generate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("llama", "mistral", "qwen2")


def _expected(family):
  return dict(np.load(os.path.join(FIXTURES, family, "expected.npz")))


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
  params, cfg = hf_import.load_hf_checkpoint(os.path.join(FIXTURES, request.param))
  return request.param, params, cfg


def test_config_fields(loaded):
  family, params, cfg = loaded
  expected = {"llama": (rope.Llama3Scaling, None, False, False, 2),
              "mistral": (rope.YarnScaling, 8, False, False, 1),
              "qwen2": (rope.DynamicNTKScaling, None, True, True, 2)}[family]
  assert (type(cfg.rope_scaling), cfg.sliding_window, cfg.qkv_bias, cfg.tie_embeddings, cfg.n_kv_heads) == expected
  shapes = jax.tree.map(lambda x: x.shape, params)
  assert shapes == llama.param_shapes(cfg)


def test_logits_match_transformers(loaded):
  family, params, cfg = loaded
  exp = _expected(family)
  tokens = jnp.asarray(exp["tokens"])
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits, _ = jax.jit(llama.forward, static_argnames="cfg")(params, tokens, positions, cfg=cfg)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), exp["logits"], atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(loaded):
  family, params, cfg = loaded
  exp = _expected(family)
  assert exp["min_margin"] > 1e-3, "fixture greedy path has near-ties; regenerate it"
  n_new = exp["generated"].shape[1]
  if isinstance(cfg.rope_scaling, rope.DynamicNTKScaling):
    # The dynamic base depends on the longest sequence of the batch and on the chunking (as in
    # transformers), so each prompt goes alone and unchunked, like the fixture's.
    for b, n in enumerate(exp["prompt_lengths"]):
      out = generate(params, cfg, exp["prompts"][b:b + 1, :n], np.array([n]), n_new, key=None)
      np.testing.assert_array_equal(np.asarray(out["tokens"][0]), exp["generated"][b])
  else:
    # Right-padded batch of different lengths, chunked prefill: equals each prompt run alone by HF.
    out = generate(params, cfg, exp["prompts"], exp["prompt_lengths"], n_new, key=None, prefill_chunk=5)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), exp["generated"])
    np.testing.assert_array_equal(np.asarray(out["lengths"]), n_new)


def test_rope_frequencies_match_transformers():
  data = np.load(os.path.join(FIXTURES, "rope.npz"))
  meta = json.loads(str(data["cases"]))
  head_dim, max_pos = meta["head_dim"], meta["max_position_embeddings"]
  for name, hf_rope in meta["cases"].items():
    scaling = hf_import.rope_scaling_from_hf(hf_rope, max_pos)
    inv_freq, factor = rope.static_inv_freq(head_dim, hf_rope["rope_theta"], scaling, max_pos)
    np.testing.assert_allclose(inv_freq, data[f"{name}/inv_freq"], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(factor, data[f"{name}/attention_factor"], rtol=1e-6, err_msg=name)
    if isinstance(scaling, rope.DynamicNTKScaling):
      for n in meta["dynamic_seq_lens"]:
        got = rope.dynamic_ntk_inv_freq(head_dim, hf_rope["rope_theta"], scaling.factor, max_pos, n)
        np.testing.assert_allclose(got, data[f"{name}/inv_freq@{n}"], rtol=1e-5, err_msg=f"{name}@{n}")


# --- Error handling: a copy of a fixture with one tensor removed, added or mis-shaped. ---

def _edited_copy(tmp_path, edit):
  path = tmp_path / "ckpt"
  shutil.copytree(os.path.join(FIXTURES, "llama"), path)
  tensors = load_file(path / "model.safetensors")
  edit(tensors)
  save_file(tensors, path / "model.safetensors")
  return str(path)


def test_missing_tensor_is_named(tmp_path):
  path = _edited_copy(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf_import.load_hf_checkpoint(path)


def test_unexpected_tensor_is_named(tmp_path):
  path = _edited_copy(tmp_path, lambda t: t.update({"model.layers.2.self_attn.q_proj.weight": np.ones((4, 4), np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.2\.self_attn\.q_proj\.weight"):
    hf_import.load_hf_checkpoint(path)


def test_misshaped_tensor_is_named(tmp_path):
  def edit(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
  path = _edited_copy(tmp_path, edit)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape \(31, 64\).*\(32, 64\)"):
    hf_import.load_hf_checkpoint(path)


def test_missing_shard_index_entry_is_named(tmp_path):
  path = tmp_path / "ckpt"
  shutil.copytree(os.path.join(FIXTURES, "mistral"), path)
  index = json.loads((path / "model.safetensors.index.json").read_text())
  del index["weight_map"]["model.norm.weight"]
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"missing.*model\.norm\.weight"):
    hf_import.load_hf_checkpoint(str(path))


def test_transformers_v4_config_format():
  """v4 wrote rope_theta at the top level and rope_scaling with "type" or "rope_type"."""
  v5 = json.loads(open(os.path.join(FIXTURES, "llama", "config.json")).read())
  rope_parameters = dict(v5["rope_parameters"])
  v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
  v4.update(rope_theta=rope_parameters.pop("rope_theta"), rope_scaling=rope_parameters)
  assert hf_import.config_from_hf(v4) == hf_import.config_from_hf(v5)
  v4["rope_scaling"]["type"] = v4["rope_scaling"].pop("rope_type")
  assert hf_import.config_from_hf(v4).rope_scaling == rope.Llama3Scaling(8.0, 1.0, 4.0, 32)
  no_scaling = {**v4, "rope_scaling": None, "rope_theta": 500000.0}
  cfg = hf_import.config_from_hf(no_scaling)
  assert cfg.rope_scaling is None and cfg.rope_theta == 500000.0


def test_unsupported_config_is_rejected():
  base = json.loads(open(os.path.join(FIXTURES, "llama", "config.json")).read())
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    hf_import.config_from_hf({**base, "model_type": "gpt2"})
  with pytest.raises(ValueError, match="rope type 'longrope'"):
    hf_import.config_from_hf({**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
  with pytest.raises(ValueError, match="mlp_bias"):
    hf_import.config_from_hf({**base, "mlp_bias": True})


def test_bfloat16_load():
  params, cfg = hf_import.load_hf_checkpoint(os.path.join(FIXTURES, "qwen2"), dtype=jnp.bfloat16)
  assert cfg.dtype == "bfloat16" and params["layers"][0]["wq"].dtype == jnp.bfloat16
  exp = _expected("qwen2")
  tokens = jnp.asarray(exp["tokens"])
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits, _ = llama.forward(params, tokens, positions, cfg=cfg)
  # bf16 weights and activations: close to the float32 logits, not equal.
  err = np.abs(np.asarray(logits) - exp["logits"])
  assert err.mean() < 0.1 * np.abs(exp["logits"]).mean()


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
  import ml_dtypes
  path = _edited_copy(tmp_path, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
  params, _ = hf_import.load_hf_checkpoint(path)
  reference, _ = hf_import.load_hf_checkpoint(os.path.join(FIXTURES, "llama"))
  wq, ref_wq = params["layers"][1]["wq"], reference["layers"][1]["wq"]
  assert wq.dtype == jnp.float32
  np.testing.assert_array_equal(wq, ref_wq.astype(jnp.bfloat16).astype(jnp.float32))


def test_live_transformers_parity():
  """Only where torch and transformers are importable (not in CI): a fresh model, compared live."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import importlib.util
  import tempfile
  spec = importlib.util.spec_from_file_location(
      "make_hf_fixtures", os.path.join(os.path.dirname(__file__), "..", "scripts", "make_hf_fixtures.py"))
  fixtures = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fixtures)
  model = fixtures.build_family("llama", seed=7)
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    params, cfg = hf_import.load_hf_checkpoint(d)
  tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 24))
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens)).logits.numpy()
  positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), tokens.shape)
  logits, _ = llama.forward(params, jnp.asarray(tokens, jnp.int32), positions, cfg=cfg)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
