"""Evaluate a finished stage: ``python eval.py --workdir=workdir``.

Reads ``<workdir>/config.json`` and ``<workdir>/final/``; writes ``<workdir>/eval/`` with
``eval.json``, ``eval.md`` and ``loss.png`` (loss curves from ``logs/metrics.jsonl``). On the
synthetic world it reports oracle helpfulness on held-out benign prompts and the refusal rate on
harmful ones, before (the initial policy) and after training. A pipeline workdir gets the policy
comparison (``llama_jax.recipe.policy_eval``: SFT vs RLHF-V1..Vk vs PPO with 95% intervals);
``--markdown`` prints its report again from ``<workdir>/eval/policy_eval.json`` without
evaluating (the README's result tables are pasted from it).
"""

import json
import logging
import os
import sys
import traceback

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Workdir of a finished train.py run.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None, "Held-out prompts (default: config).")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/llama_jax/jax"),
    "JAX persistent compilation cache ('' = off).")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the markdown report of an evaluated "
                              "pipeline workdir (eval/policy_eval.json) and exit.")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/TFDS chatter
  if _MARKDOWN.value:
    from llama_jax import evaluation  # pylint: disable=import-outside-toplevel
    path = os.path.join(_WORKDIR.value, "eval", "policy_eval.json")
    if not os.path.isfile(path):
      raise app.UsageError(f"{path} not found: run `python eval.py --workdir={_WORKDIR.value}` "
                           "on a finished pipeline workdir first")
    with open(path) as f:
      print(evaluation.policy_markdown(json.load(f)))
    return
  from llama_jax.train import build  # pylint: disable=import-outside-toplevel
  from llama_jax.recipe import eval_run  # pylint: disable=import-outside-toplevel
  build.enable_compilation_cache(_JAX_CACHE.value)
  try:
    result = eval_run.run(_WORKDIR.value, _NUM_PROMPTS.value)
  except (ValueError, FileNotFoundError) as err:  # e.g. no final/, a non-finite model
    where = traceback.extract_tb(err.__traceback__)[-1]
    print(f"eval.py: error: {err}\n  (raised at {where.filename}:{where.lineno})", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
  app.run(main)
