"""Tests for llama_jax.convert against Hugging Face transformers' LlamaForCausalLM.

References are independent of the module under test: HF checkpoints come from transformers'
``save_pretrained``; the Meta checkpoint (2 fairscale model-parallel shards) and its HF state dict
are written here with the test's own splitting and RoPE permutation code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from llama_jax import convert, losses
from llama_jax.config import LlamaConfig
from llama_jax.model import forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # max |logit difference| in float32 (HF and ours use different RoPE formulations)


def tiny_cfg(**kw) -> LlamaConfig:
  """GQA, ffn_dim_multiplier and rope_theta != 1e4 (ffn hidden 224)."""
  return LlamaConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                               multiple_of=16, ffn_dim_multiplier=1.3, rope_theta=5e5,
                               max_seq_len=512), **kw})


def hf_model(cfg: LlamaConfig, seed: int, state_dict=None) -> transformers.LlamaForCausalLM:
  """Random HF model: std 0.25 weights (well-spread logits), norm weights uniform in [0.5, 1.5]."""
  hf_cfg = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "torch_dtype")}
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg))
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    if state_dict is not None:
      model.load_state_dict(state_dict, strict=True)
    else:
      for name, p in model.named_parameters():
        if "norm" in name:
          p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        else:
          p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
  return model.eval()


def from_pretrained(path, **kw) -> transformers.LlamaForCausalLM:
  return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", **kw).eval()


def tokens_for(cfg: LlamaConfig, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 256), dtype=np.int32)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def our_logits(cfg: LlamaConfig, params, tokens: np.ndarray) -> np.ndarray:
  return np.asarray(forward(params, jnp.asarray(tokens), cfg))


def hf_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
  """(cfg, HF model, checkpoint dir) for the GQA config, saved by transformers."""
  cfg = tiny_cfg()
  model = hf_model(cfg, seed=0)
  path = tmp_path_factory.mktemp("hf_gqa")
  model.save_pretrained(path)
  return cfg, model, str(path)


# ---- Hugging Face import: logit parity -----------------------------------------------------------
@pytest.mark.parametrize("variant", ["gqa_sharded", "mha"])
def test_load_hf_matches_transformers(variant, hf_ckpt, tmp_path):
  if variant == "gqa_sharded":
    cfg, model, _ = hf_ckpt
    model.save_pretrained(tmp_path, max_shard_size="200KB")  # ~510 KB of float32 weights
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 2
  else:
    cfg = tiny_cfg(n_kv_heads=None, ffn_dim_multiplier=None, rope_theta=1e4)
    model = hf_model(cfg, seed=1)
    model.save_pretrained(tmp_path)
  loaded_cfg, params = convert.load_hf(tmp_path)
  assert (loaded_cfg.dim, loaded_cfg.n_layers, loaded_cfg.n_heads, loaded_cfg.kv_heads,
          loaded_cfg.vocab_size, loaded_cfg.ffn_hidden_dim, loaded_cfg.rope_theta) == (
              cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.vocab_size,
              cfg.ffn_hidden_dim, cfg.rope_theta)
  assert params["layers"]["attention"]["wk"].shape == (2, 64, cfg.kv_heads, 16)
  assert params["tok_embeddings"].dtype == np.float32
  tokens = tokens_for(cfg)
  ref = hf_logits(model, tokens)
  assert ref.std() > 1.0  # well-spread logits, so a small tolerance is meaningful
  diff = np.abs(our_logits(loaded_cfg, params, tokens) - ref).max()
  assert diff <= TOL, f"max |dlogit| = {diff}"


@pytest.mark.parametrize("scan_layers", [True, False])
def test_gradients_match_transformers(scan_layers, hf_ckpt, tmp_path):
  """Gradients of the mean next-token cross-entropy vs torch autograd through HF's model.

  Covers the hand-written backward passes (chunked causal attention over 255 positions, RMSNorm,
  SwiGLU) end to end. HF's gradients are mapped to our layout by saving them in place of the
  weights and loading them with load_hf: the RoPE row permutation and transposes are linear
  re-indexings, so they map gradients exactly as they map weights.
  """
  cfg, model, path = hf_ckpt
  loaded_cfg, params = convert.load_hf(path)
  loaded_cfg = loaded_cfg.replace(scan_layers=scan_layers)
  tokens = tokens_for(cfg, seed=3)
  ids = torch.from_numpy(tokens.astype(np.int64))
  model.zero_grad(set_to_none=True)
  model(input_ids=ids, labels=ids).loss.backward()
  grads_model = hf_model(cfg, seed=0)
  with torch.no_grad():
    for p, g in zip(model.parameters(), grads_model.parameters()):
      g.copy_(p.grad)
  model.zero_grad(set_to_none=True)  # the module-scoped model is shared with other tests
  grads_model.save_pretrained(tmp_path)
  _, ref = convert.load_hf(tmp_path)

  def loss(params):
    logp = losses.token_logprobs(forward(params, jnp.asarray(tokens[:, :-1]), loaded_cfg),
                                 jnp.asarray(tokens[:, 1:]))
    return -jnp.mean(logp)

  ours = jax.grad(loss)(params)
  for key, a, b in zip(_leaf_names(ref), jax.tree.leaves(ours), jax.tree.leaves(ref)):
    scale = np.abs(b).max()
    assert scale > 0, key
    err = np.abs(np.asarray(a) - b).max()
    assert err <= 1e-4 * scale, f"{key}: max |dgrad| {err:.2e} vs max |grad| {scale:.2e}"


def _leaf_names(tree):
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_load_hf_layout(hf_ckpt):
  """Spot-check the table against the HF module's own weights (layout, not just logits)."""
  cfg, model, path = hf_ckpt
  _, params = convert.load_hf(path)
  layer = model.model.layers[1]
  wv = layer.self_attn.v_proj.weight.detach().numpy()  # [k*h, d]
  np.testing.assert_array_equal(params["layers"]["attention"]["wv"][1], wv.T.reshape(64, 2, 16))
  w2 = layer.mlp.down_proj.weight.detach().numpy()  # [d, f]
  np.testing.assert_array_equal(params["layers"]["feed_forward"]["w2"][1], w2.T)
  np.testing.assert_array_equal(params["output"], model.lm_head.weight.detach().numpy().T)
  np.testing.assert_array_equal(params["layers"]["ffn_norm"][1],
                                layer.post_attention_layernorm.weight.detach().numpy())


# ---- Hugging Face export -------------------------------------------------------------------------
@pytest.mark.parametrize("max_shard_bytes", [convert.DEFAULT_MAX_SHARD_BYTES, 150_000])
def test_hf_round_trip(max_shard_bytes, hf_ckpt, tmp_path):
  cfg, model, path = hf_ckpt
  loaded_cfg, params = convert.load_hf(path)
  files = convert.save_hf(tmp_path / "out", loaded_cfg, params, max_shard_bytes=max_shard_bytes)
  assert (len(files) > 1) == (max_shard_bytes < 500_000)
  assert os.path.isfile(tmp_path / "out" / "model.safetensors.index.json") == (len(files) > 1)
  reloaded = from_pretrained(tmp_path / "out")
  want, got = hf_state(model), hf_state(reloaded)
  assert sorted(want) == sorted(got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  tokens = tokens_for(cfg, seed=1)
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))


def test_hf_bfloat16(hf_ckpt, tmp_path):
  """bf16 export is the HF tensors rounded to bf16; bf16 import keeps bf16 (ml_dtypes)."""
  _, model, path = hf_ckpt
  cfg, params = convert.load_hf(path)
  convert.save_hf(tmp_path, cfg, params, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  reloaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
  for key, value in model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[key], value.to(torch.bfloat16)), key
  bf_cfg, bf_params = convert.load_hf(tmp_path)
  assert bf_cfg.param_dtype == "bfloat16"
  assert bf_params["layers"]["attention"]["wq"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(bf_params["output"].astype(np.float32),
                                params["output"].astype(ml_dtypes.bfloat16).astype(np.float32))


# ---- Meta import ---------------------------------------------------------------------------------
def _meta_weights(cfg: LlamaConfig, seed: int) -> dict[str, np.ndarray]:
  """Full (unsharded) Meta tensors, torch layout [out, in]."""
  rng = np.random.default_rng(seed)
  d, f, v, nh, kh = cfg.dim, cfg.ffn_hidden_dim, cfg.vocab_size, cfg.dim, cfg.kv_heads * cfg.head_dim
  shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
  for i in range(cfg.n_layers):
    p = f"layers.{i}."
    shapes.update({p + "attention.wq.weight": (nh, d), p + "attention.wk.weight": (kh, d),
                   p + "attention.wv.weight": (kh, d), p + "attention.wo.weight": (d, nh),
                   p + "feed_forward.w1.weight": (f, d), p + "feed_forward.w2.weight": (d, f),
                   p + "feed_forward.w3.weight": (f, d), p + "attention_norm.weight": (d,),
                   p + "ffn_norm.weight": (d,)})
  return {k: (rng.uniform(0.5, 1.5, s) if "norm" in k else rng.normal(0, 0.25, s)).astype(np.float32)
          for k, s in shapes.items()}


def _fairscale_axis(key: str):
  """ColumnParallelLinear dim 0, RowParallelLinear / ParallelEmbedding dim 1, norms replicated."""
  if "norm" in key:
    return None
  if any(w in key for w in ("wo.", "w2.", "tok_embeddings")):
    return 1
  return 0


def write_meta(path, cfg: LlamaConfig, weights: dict[str, np.ndarray], n_shards: int = 2,
               params_json=None, torch_dtype=torch.float32):
  os.makedirs(path, exist_ok=True)
  for s in range(n_shards):
    shard = {"rope.freqs": torch.zeros(cfg.head_dim // 2)}  # present in some Meta files; ignored
    for key, w in weights.items():
      axis = _fairscale_axis(key)
      piece = w if axis is None else np.split(w, n_shards, axis=axis)[s]
      shard[key] = torch.from_numpy(np.ascontiguousarray(piece)).to(torch_dtype)
    torch.save(shard, os.path.join(path, f"consolidated.{s:02d}.pth"))
  pj = params_json or {**cfg.to_params_json(), "vocab_size": -1}
  with open(os.path.join(path, "params.json"), "w") as f:
    json.dump(pj, f)


def meta_to_hf_state(cfg: LlamaConfig, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """HF state dict from full Meta tensors (names and rotate-half permutation written out here)."""
  def permute(w, heads):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(0, 2, 1, 3).reshape(w.shape)

  out = {"model.embed_tokens.weight": weights["tok_embeddings.weight"],
         "model.norm.weight": weights["norm.weight"], "lm_head.weight": weights["output.weight"]}
  names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
           "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
           "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
           "ffn_norm": "post_attention_layernorm"}
  for i in range(cfg.n_layers):
    m, h = f"layers.{i}.", f"model.layers.{i}."
    out[h + "self_attn.q_proj.weight"] = permute(weights[m + "attention.wq.weight"], cfg.n_heads)
    out[h + "self_attn.k_proj.weight"] = permute(weights[m + "attention.wk.weight"], cfg.kv_heads)
    for meta_name, hf_name in names.items():
      out[h + hf_name + ".weight"] = weights[m + meta_name + ".weight"]
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


@pytest.fixture(scope="module")
def meta_ckpt(tmp_path_factory):
  """(cfg, full Meta weights, 2-shard checkpoint dir, HF model with the same weights)."""
  cfg = tiny_cfg()
  weights = _meta_weights(cfg, seed=2)
  path = str(tmp_path_factory.mktemp("meta"))
  write_meta(path, cfg, weights)
  return cfg, weights, path, hf_model(cfg, 0, state_dict=meta_to_hf_state(cfg, weights))


def test_load_meta_matches_transformers(meta_ckpt):
  cfg, weights, path, model = meta_ckpt
  loaded_cfg, params = convert.load_meta(path)
  assert loaded_cfg.vocab_size == 128  # params.json says -1: read from tok_embeddings
  assert (loaded_cfg.ffn_hidden_dim, loaded_cfg.kv_heads) == (224, 2)
  np.testing.assert_array_equal(params["layers"]["attention"]["wo"][1],
                                weights["layers.1.attention.wo.weight"].T.reshape(4, 16, 64))
  tokens = tokens_for(cfg, seed=3)
  diff = np.abs(our_logits(loaded_cfg, params, tokens) - hf_logits(model, tokens)).max()
  assert diff <= TOL, f"max |dlogit| = {diff}"


def test_load_meta_bfloat16(tmp_path):
  cfg = tiny_cfg(n_layers=1)
  weights = _meta_weights(cfg, seed=4)
  write_meta(tmp_path, cfg, weights, n_shards=2, torch_dtype=torch.bfloat16)
  loaded_cfg, params = convert.load_meta(tmp_path)
  assert loaded_cfg.param_dtype == "bfloat16"
  w1 = params["layers"]["feed_forward"]["w1"]
  assert w1.dtype == ml_dtypes.bfloat16
  want = weights["layers.0.feed_forward.w1.weight"].astype(ml_dtypes.bfloat16).T
  np.testing.assert_array_equal(w1[0].astype(np.float32), want.astype(np.float32))
  _, params32 = convert.load_meta(tmp_path, dtype="float32")
  assert params32["tok_embeddings"].dtype == np.float32


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_meta_input(meta_ckpt, tmp_path):
  cfg, weights, _, _ = meta_ckpt
  one = tmp_path / "one_of_two"
  write_meta(one, cfg, weights)
  os.remove(one / "consolidated.01.pth")
  with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth"):
    convert.load_meta(one)
  wrong_dim = tmp_path / "wrong_dim"
  write_meta(wrong_dim, cfg, weights, params_json={**cfg.to_params_json(), "dim": 128})
  with pytest.raises(ValueError, match=r"consolidated\.00\.pth: tensor norm\.weight has shape "
                                       r"\(64,\), expected \(128,\)"):
    convert.load_meta(wrong_dim)
  wrong_kv = tmp_path / "wrong_kv"
  write_meta(wrong_kv, cfg, weights, params_json={**cfg.to_params_json(), "n_kv_heads": 4})
  with pytest.raises(ValueError, match=r"consolidated\.00\.pth: tensor layers\.0\.attention\.wk\.weight "
                                       r"has shape \(16, 64\), expected \(32, 64\)"):
    convert.load_meta(wrong_kv)
  os.remove(wrong_kv / "params.json")
  with pytest.raises(FileNotFoundError, match="params.json"):
    convert.load_meta(wrong_kv)
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    convert.load_meta(tmp_path / "does_not_exist")


def test_bad_hf_input(hf_ckpt, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  _, model, path = hf_ckpt
  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="200KB")
  victim = sorted(sharded.glob("model-*.safetensors"))[-1]
  os.remove(victim)
  with pytest.raises(FileNotFoundError, match=victim.name):
    convert.load_hf(sharded)

  tensors = load_file(os.path.join(path, "model.safetensors"))
  config = json.loads(open(os.path.join(path, "config.json")).read())
  def write(name, tensors, **cfg_changes):
    os.makedirs(tmp_path / name)
    save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / name / "config.json").write_text(json.dumps({**config, **cfg_changes}))
    return tmp_path / name
  with pytest.raises(ValueError, match=r"wrong_ffn/model\.safetensors: tensor model\.layers\.0\.mlp\."
                                       r"\w+_proj\.weight has shape \((224, 64|64, 224)\), expected "
                                       r"\((192, 64|64, 192)\)"):
    convert.load_hf(write("wrong_ffn", tensors, intermediate_size=192))
  with pytest.raises(ValueError, match=r"missing keys.*lm_head\.weight"):
    convert.load_hf(write("missing", {k: v for k, v in tensors.items() if k != "lm_head.weight"}))
  extra = {**tensors, "model.layers.2.mlp.up_proj.weight": tensors["model.layers.0.mlp.up_proj.weight"]}
  with pytest.raises(ValueError, match=r"unexpected keys.*model\.layers\.2\.mlp\.up_proj\.weight"):
    convert.load_hf(write("extra", extra))
  for bad in (np.nan, np.inf):
    poisoned = dict(tensors)
    w = poisoned["model.layers.1.self_attn.v_proj.weight"].copy()
    w[3, 5] = bad
    poisoned["model.layers.1.self_attn.v_proj.weight"] = w
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.self_attn\.v_proj\.weight holds "
                                         r"NaN or Inf"):
      convert.load_hf(write(f"poisoned_{bad}", poisoned))
  cut = write("truncated", tensors) / "model.safetensors"
  cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
  with pytest.raises(ValueError, match=r"truncated/model\.safetensors: not a complete safetensors"):
    convert.load_hf(cut.parent)
  os.remove(tmp_path / "extra" / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert.load_hf(tmp_path / "extra")
  cfg, params = convert.load_hf(path)
  del params["layers"]["feed_forward"]["w3"]
  with pytest.raises(ValueError, match="feed_forward/w3"):
    convert.save_hf(tmp_path / "never", cfg, params)


# ---- orbax and the command line ------------------------------------------------------------------
def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "llama_jax.convert", *map(str, args)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_cli_hf_to_orbax(hf_ckpt, tmp_path):
  _, _, path = hf_ckpt
  _cli("--from", "hf", "--to", "orbax", path, tmp_path / "orbax")
  want_cfg, want = convert.load_hf(path)
  got_cfg, got = convert.load_orbax(tmp_path / "orbax")
  assert got_cfg.to_params_json() == want_cfg.to_params_json()
  assert got_cfg.ffn_hidden_dim == want_cfg.ffn_hidden_dim
  for (path_w, w), (path_g, g) in zip(_leaves(want), _leaves(got)):
    assert path_w == path_g and isinstance(g, np.ndarray)
    np.testing.assert_array_equal(g, w, err_msg=path_w)


def _leaves(tree, prefix=""):
  for k in sorted(tree):
    if isinstance(tree[k], dict):
      yield from _leaves(tree[k], prefix + k + "/")
    else:
      yield prefix + k, tree[k]


def test_cli_meta_to_hf(meta_ckpt, tmp_path):
  cfg, _, path, model = meta_ckpt
  _cli("--from", "meta", "--to", "hf", "--max_shard_bytes", "200000", path, tmp_path / "hf")
  assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
  reloaded = from_pretrained(tmp_path / "hf")
  for key, value in model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[key], value), key
  tokens = tokens_for(cfg, seed=5)
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))
