"""The recipe above the stages: ``stages`` (the registry ``config.stage`` names), ``pipeline``
(SFT -> RMs -> rejection sampling -> PPO in one workdir), ``annotate`` (on-policy preference
rounds), ``dry_run`` (memory plans), ``policy_eval`` / ``eval_run`` / ``overoptimization``
(what ``eval.py`` reports)."""
