"""policy_eval helpers: temperature-1 samples and their KL to a reference policy."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from llama_jax import policy_eval
from llama_jax.config import LlamaConfig
from llama_jax.data import world, world_tokenizer
from llama_jax.model import init_params
from llama_jax.tokenizer import Tokenizer

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16,
                  max_seq_len=128)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return Tokenizer(world_tokenizer.train_tokenizer(path, world.WorldConfig(), vocab_size=320))


def test_samples_and_kl(tokenizer):
  prompts = [r["prompt"] for r in world.sample_prompts(world.WorldConfig(), "held_out", 3)]
  params = init_params(CFG, jax.random.key(0))
  other = init_params(CFG, jax.random.key(1))
  kl, texts = policy_eval.sample_with_kl(params, params, CFG, tokenizer, prompts,
                                         max_new_tokens=6, samples_per_prompt=2, batch_size=4)
  assert kl == 0.0 and len(texts) == 6 and all(isinstance(t, str) for t in texts)
  # Same seed, same policy: the same samples whatever the reference.
  kl2, texts2 = policy_eval.sample_with_kl(params, other, CFG, tokenizer, prompts,
                                           max_new_tokens=6, samples_per_prompt=2, batch_size=4)
  assert texts2 == texts and np.isfinite(kl2) and kl2 != 0.0
  # No reference: the same samples, KL 0 without the teacher-forced passes.
  assert policy_eval.sample_with_kl(params, None, CFG, tokenizer, prompts, max_new_tokens=6,
                                    samples_per_prompt=2, batch_size=4) == (0.0, texts)
  with pytest.raises(ValueError, match="samples_per_prompt"):
    policy_eval.sample_with_kl(params, params, CFG, tokenizer, prompts, max_new_tokens=6,
                               samples_per_prompt=0)
