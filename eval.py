"""Evaluate a finished stage: ``python eval.py --workdir=workdir``.

Reads ``<workdir>/config.json`` and ``<workdir>/final/``; writes ``<workdir>/eval/`` with
``eval.json``, ``eval.md`` and ``loss.png`` (loss curves from ``logs/metrics.jsonl``). On the
synthetic world it reports oracle helpfulness on held-out benign prompts and the refusal rate on
harmful ones, before (the initial policy) and after training.
"""

import json
import logging

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Workdir of a finished train.py run.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None, "Held-out prompts (default: config).")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/TFDS chatter
  from llama_jax import eval_run  # pylint: disable=import-outside-toplevel
  print(json.dumps(eval_run.run(_WORKDIR.value, _NUM_PROMPTS.value), indent=2, default=str))


if __name__ == "__main__":
  app.run(main)
