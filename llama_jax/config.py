"""Llama 2 model configuration with Meta's ``params.json`` names, plus presets.

Presets follow the Llama 2 paper (Touvron et al. 2023, Sec. 2.2, Table 1) and Meta's released
``params.json`` files. The feed-forward hidden size is derived exactly as in Meta's
``llama/model.py`` (``FeedForward.__init__``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")
_REMAT = ("none", "minimal", "full")
_ATTENTION = ("auto", "xla", "cudnn")


def _read_json_object(path: str) -> dict:
  """The JSON object in ``path``.

  Raises:
    ValueError: naming the file, if it is not UTF-8 JSON holding an object.
  """
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    raise ValueError(f"{path}: not a JSON config ({type(e).__name__}: {e})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  return obj


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a Llama 2 network.

  Architecture fields use Meta's ``params.json`` names. Execution fields (dtypes, scan, remat,
  attention implementation) change how the network runs, never its parameters.

  Raises:
    ValueError: naming the field, if a value is impossible (e.g. ``n_heads`` not divisible by
      ``n_kv_heads``, an odd head dimension, an unknown dtype).
  """

  dim: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: Optional[int] = None  # None = n_heads (multi-head attention), as in Meta's code
  vocab_size: int = 32000
  multiple_of: int = 256
  ffn_dim_multiplier: Optional[float] = None
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_seq_len: int = 4096
  # Execution options (not part of params.json).
  dtype: str = "float32"  # compute dtype of activations
  param_dtype: str = "float32"  # storage dtype of parameters
  scan_layers: bool = True  # nn.scan over layers (False = the same loop fully unrolled)
  remat: str = "none"  # activation checkpointing per layer: none | minimal | full
  # Training/scoring attention: "auto" = llama_jax's chunked causal kernel on CPU and
  # jax.nn.dot_product_attention's own choice elsewhere; "xla" / "cudnn" = that
  # jax.nn.dot_product_attention implementation on every backend (cudnn: NVIDIA GPUs only).
  # Decoding with a KV cache always uses llama_jax's kernel.
  attention_impl: str = "auto"

  def __post_init__(self):
    for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0):
      raise ValueError(f"LlamaConfig.n_kv_heads must be a positive int or None, got {self.n_kv_heads!r}")
    if self.dim % self.n_heads:
      raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
    if self.n_heads % self.kv_heads:
      raise ValueError(
          f"LlamaConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
    if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
      raise ValueError(f"LlamaConfig.ffn_dim_multiplier must be > 0 or None, got {self.ffn_dim_multiplier}")
    if not self.norm_eps > 0:
      raise ValueError(f"LlamaConfig.norm_eps must be > 0, got {self.norm_eps}")
    if not self.rope_theta > 0:
      raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"LlamaConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
    if self.remat not in _REMAT:
      raise ValueError(f"LlamaConfig.remat must be one of {_REMAT}, got {self.remat!r}")
    if self.attention_impl not in _ATTENTION:
      raise ValueError(f"LlamaConfig.attention_impl must be one of {_ATTENTION}, got {self.attention_impl!r}")

  # ---- derived sizes -------------------------------------------------------------------------
  @property
  def kv_heads(self) -> int:
    """Number of key/value heads (``n_kv_heads`` or ``n_heads``)."""
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def ffn_hidden_dim(self) -> int:
    """SwiGLU hidden size, exactly as Meta's ``FeedForward``: round_up(mult * int(8 dim / 3))."""
    hidden = int(2 * (4 * self.dim) / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Exact parameter count (untied embeddings, no biases)."""
    d, f, h = self.dim, self.ffn_hidden_dim, self.head_dim
    attn = d * self.n_heads * h * 2 + d * self.kv_heads * h * 2
    layer = attn + 3 * d * f + 2 * d
    return self.n_layers * layer + 2 * self.vocab_size * d + d

  # ---- conversions ---------------------------------------------------------------------------
  def to_params_json(self) -> dict:
    """Meta ``params.json`` dictionary for this config."""
    out = {
        "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
        "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
        "multiple_of": self.multiple_of, "ffn_dim_multiplier": self.ffn_dim_multiplier,
        "norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "max_seq_len": self.max_seq_len,
    }
    return {k: v for k, v in out.items() if v is not None}

  @classmethod
  def from_params_json(cls, source: "str | os.PathLike | Mapping[str, Any]", **overrides) -> "LlamaConfig":
    """Config from a Meta ``params.json`` (path or dict).

    Meta's released files write ``vocab_size: -1`` (the tokenizer decides); pass ``vocab_size=``
    in ``overrides`` or get the default 32000. Unknown keys raise ValueError.
    """
    if isinstance(source, Mapping):
      params = dict(source)
      origin = "params.json dict"
    else:
      origin = os.fspath(source)
      params = _read_json_object(origin)
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size"}
    unknown = set(params) - known
    if unknown:
      raise ValueError(f"{origin}: unknown params.json keys {sorted(unknown)}")
    params.pop("max_batch_size", None)
    if params.get("vocab_size", -1) == -1:
      params["vocab_size"] = 32000
    params.update(overrides)
    return cls(**params)

  @classmethod
  def from_hf_config(cls, source: "str | os.PathLike | Mapping[str, Any]", **overrides) -> "LlamaConfig":
    """Config from a Hugging Face ``config.json`` (path to the file or its directory, or a dict).

    Raises ValueError if the config is not a plain Llama (biases, tied embeddings, rope scaling,
    or an ``intermediate_size`` that Meta's rounding cannot produce).
    """
    if isinstance(source, Mapping):
      hf = dict(source)
      origin = "HF config dict"
    else:
      origin = os.fspath(source)
      if os.path.isdir(origin):
        origin = os.path.join(origin, "config.json")
      hf = _read_json_object(origin)
    if hf.get("model_type", "llama") != "llama":
      raise ValueError(f"{origin}: model_type is {hf.get('model_type')!r}, expected 'llama'")
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
      if hf.get(key):
        raise ValueError(f"{origin}: {key}=True is not supported by Llama 2")
    if hf.get("rope_scaling") not in (None, {}) and (hf["rope_scaling"] or {}).get("rope_type", "default") != "default":
      raise ValueError(f"{origin}: rope_scaling {hf['rope_scaling']} is not supported by Llama 2")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{origin}: hidden_act {hf.get('hidden_act')!r}, expected 'silu'")
    dim = hf["hidden_size"]
    n_heads = hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads", n_heads)
    if hf.get("head_dim") not in (None, dim // n_heads):
      raise ValueError(f"{origin}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    theta = hf.get("rope_theta")
    if theta is None:
      theta = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_theta", 10000.0)
    fields = dict(
        dim=dim,  # <- hidden_size (HF)
        n_layers=hf["num_hidden_layers"],  # <- num_hidden_layers (HF)
        n_heads=n_heads,  # <- num_attention_heads (HF)
        n_kv_heads=None if n_kv == n_heads else n_kv,  # <- num_key_value_heads (HF)
        vocab_size=hf["vocab_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5),  # <- rms_norm_eps (HF)
        rope_theta=float(theta),
        max_seq_len=hf.get("max_position_embeddings", 4096),  # <- max_position_embeddings (HF)
    )
    fields.update(_ffn_fields_for(dim, hf["intermediate_size"], origin))
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self) -> dict:
    """A Hugging Face ``LlamaConfig`` dictionary (``model_type='llama'``) for this config."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": self.dim, "intermediate_size": self.ffn_hidden_dim,
        "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
        "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab_size,
        "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
        "max_position_embeddings": self.max_seq_len, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": self.param_dtype,
    }

  # ---- presets (Llama 2 paper, Table 1; Meta params.json) -----------------------------------
  @classmethod
  def llama2_7b(cls, **kw) -> "LlamaConfig":
    return cls(**{**dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256), **kw})

  @classmethod
  def llama2_13b(cls, **kw) -> "LlamaConfig":
    return cls(**{**dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256), **kw})

  @classmethod
  def llama2_34b(cls, **kw) -> "LlamaConfig":
    # Unreleased; shapes as the released 34B Llama-2-based models (ffn hidden 22016).
    return cls(**{**dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256), **kw})

  @classmethod
  def llama2_70b(cls, **kw) -> "LlamaConfig":
    return cls(**{**dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                         ffn_dim_multiplier=1.3), **kw})

  @classmethod
  def tiny(cls, **kw) -> "LlamaConfig":
    """A small config for tests and the CPU demo (GQA on, ~0.2M params with vocab 256)."""
    return cls(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                         multiple_of=16, max_seq_len=256), **kw})

  @classmethod
  def preset(cls, name: str, **kw) -> "LlamaConfig":
    """Preset by name: ``llama2_7b``, ``llama2_13b``, ``llama2_34b``, ``llama2_70b`` or ``tiny``."""
    if name not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; choose one of {PRESETS}")
    return getattr(cls, name)(**kw)


PRESETS = ("tiny", "llama2_7b", "llama2_13b", "llama2_34b", "llama2_70b")


def _ffn_fields_for(dim: int, hidden: int, origin: str) -> dict:
  """(multiple_of, ffn_dim_multiplier) that reproduce ``hidden`` under Meta's rounding."""
  for multiple_of in (256, 4096, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1):
    if LlamaConfig(dim=dim, n_heads=1, multiple_of=multiple_of).ffn_hidden_dim == hidden:
      return {"multiple_of": multiple_of, "ffn_dim_multiplier": None}
  base = int(2 * (4 * dim) / 3)
  for multiple_of in (4096, 256, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1):
    if hidden % multiple_of:
      continue
    for mult in (1.3, round(hidden / base, 6)):  # 1.3 first: Llama 2 70B's params.json value
      cfg = LlamaConfig(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=mult)
      if cfg.ffn_hidden_dim == hidden:
        return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
  raise ValueError(f"{origin}: intermediate_size {hidden} cannot be produced by Meta's FFN rounding "
                   f"for dim {dim}")
