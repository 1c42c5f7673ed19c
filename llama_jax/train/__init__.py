"""Training machinery every stage shares: ``state`` (TrainState, gradient accumulation, sharded
setup), ``loop`` (steps, logging, evaluation, checkpoints, signals), ``stage`` (the one stage
skeleton: prepare -> state -> loop -> export), ``workdir`` (config.json, final/, result.json),
``settings`` / ``fields`` (typed train / optimizer / eval sections; the stage sections are in
``recipe.sections``), ``build`` (config -> objects), ``optim``, ``checkpoint``, ``metrics``."""
