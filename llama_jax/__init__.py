"""llama_jax: Llama 2 and the Llama-2-Chat alignment recipe in JAX/Flax."""

from llama_jax.config import LlamaConfig
from llama_jax.model import KVCache, forward, forward_cached, init_cache, init_params, param_logical_axes

__all__ = ["LlamaConfig", "KVCache", "forward", "forward_cached", "init_cache", "init_params",
           "param_logical_axes"]
