"""llama_jax: Llama 2 and the Llama-2-Chat alignment recipe in JAX/Flax."""

from llama_jax import convert, losses, sharding
from llama_jax.config import LlamaConfig
from llama_jax.model import (KVCache, forward, forward_cached, init_cache, init_params,
                             param_logical_axes)
from llama_jax.sampling import GenerateOutput, generate
from llama_jax.tokenizer import Tokenizer

__all__ = ["LlamaConfig", "KVCache", "forward", "forward_cached", "init_cache", "init_params",
           "param_logical_axes", "GenerateOutput", "generate", "Tokenizer"]
