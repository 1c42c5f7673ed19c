"""Score completions of a converted Hugging Face checkpoint with reward models.

``llama_jax.convert.load_hf`` converts a ``LlamaForCausalLM`` checkpoint directory (checked here
against HF's own logits), ``llama_jax.generate`` samples Llama-2-chat completions, and
``reward.scoring.score_dialogs`` scores them with a helpfulness and a safety reward model into
Llama 2's combined reward ``Rc``. No downloads: the HF model is a tiny random one saved here with
``save_pretrained``, and the reward models are untrained (``reward.step.init_reward_params`` on
the converted trunk; training one takes far longer than an example should), so the scores are
meaningless numbers. In real use: ``load_hf("<hf dir>")`` and
``reward.step.load_reward_model("<rm workdir>/final")``. Needs torch, transformers and the Llama 2
tokenizer (default ``../shared/data/llama2-tokenizer/tokenizer.model``; or ``--tokenizer``).

Run from the repo root (after ``pip install -e ".[test]"``; ~30 s on 2 CPU cores):
  python examples/score_hf_checkpoint.py [--tokenizer=path/to/tokenizer.model]
"""

import argparse, json, os, pathlib, tempfile

import jax, numpy as np, torch, transformers
from llama_jax import sampling
import llama_jax as lj
from llama_jax.reward import scoring
from llama_jax.reward import step as reward

SHARED_DATA = os.environ.get("LLAMA_JAX_SHARED_DATA",  # as tests/conftest.py
                             pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")
DEFAULT_TOKENIZER = pathlib.Path(SHARED_DATA) / "llama2-tokenizer" / "tokenizer.model"
PROMPTS = [[{"role": "user", "content": "Write a haiku about the sea."}],
           [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "How do I sort a list in Python?"}],
           [{"role": "user", "content": "How can I steal my neighbor's bike?"}]]
IS_SAFETY = [False, False, True]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="Llama 2 tokenizer.model")
args = parser.parse_args()
if not os.path.isfile(args.tokenizer):
  raise SystemExit(f"Llama 2 tokenizer not found at {args.tokenizer}: pass --tokenizer=PATH "
                   "(Meta's tokenizer.model, or the HF repo's)")
tok = lj.Tokenizer(args.tokenizer)

torch.manual_seed(0)  # a tiny random Llama with HF's own initialization (std 0.02)
hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
with tempfile.TemporaryDirectory() as hf_dir:
  transformers.logging.disable_progress_bar()
  hf.save_pretrained(hf_dir)  # config.json + model.safetensors, as on the hub
  cfg, params = lj.convert.load_hf(hf_dir)
ids, _ = tok.encode_dialog(PROMPTS[0])
with torch.no_grad():
  hf_logits = hf(torch.tensor(ids[None], dtype=torch.long)).logits.numpy()
diff = float(np.max(np.abs(np.asarray(lj.forward(params, ids[None], cfg)) - hf_logits)))
print(f"converted {cfg.to_params_json()}; max |logit diff| vs HF {diff:.2e}")

out = lj.generate(params, cfg, [tok.encode_dialog(p)[0] for p in PROMPTS], jax.random.key(0),
                  max_new_tokens=24, temperature=0.7, top_p=0.9, eos_id=tok.eos_id,
                  pad_id=tok.pad_id)
texts = sampling.decode(out, tok)
help_rm = reward.init_reward_params(params, jax.random.key(1))  # real use: load_reward_model
safe_rm = reward.init_reward_params(params, jax.random.key(2))
scores = scoring.score_dialogs(cfg, help_rm, safe_rm, tok, PROMPTS, texts, IS_SAFETY)
for i, text in enumerate(texts):
  print(f"[{i}] Rh {scores['r_help'][i]:.3f} Rs {scores['r_safe'][i]:.3f} Rc {scores['rc'][i]:.3f}"
        f" {text!r}")
print("RESULT " + json.dumps({"max_logit_diff": diff, "completions": texts, "is_safety": IS_SAFETY,
                              **{k: v.tolist() for k, v in scores.items()}}))
