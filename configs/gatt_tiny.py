"""Ghost Attention on the synthetic world (Llama 2 Sec. 3.3), CPU-sized.

A world whose SFT data teaches long dialogs and system instructions, but never an instruction
that holds over turns: 30% of the SFT dialogs are multi-turn (2 to 20 benign exchanges, no
instruction; ``data.world_multiturn_fraction``) and 50% of the others start with a system
instruction ("Begin / End every answer with the word Ahoy.") that their one answer follows
(``data.world_instruction_fraction``). The pipeline trains SFT (1,024-token context) and one
reward-model pair (unused by GAtt), then runs GAtt from the SFT policy (``pipeline.methods``) in
``<workdir>/gatt``, which ends by measuring adherence per turn over 20-turn held-out dialogs
(``<workdir>/gatt/adherence.{json,png}``)::

  python train.py --config=configs/gatt_tiny.py --workdir=/tmp/gatt
  python eval.py --workdir=/tmp/gatt   # single-turn helpfulness of SFT vs GAtt
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.model.max_seq_len = 1024  # 20 turns of the world take ~600 tokens (~30 per exchange)
  c.data.max_seq_len = 1024
  c.data.batch_size = 8
  c.data.world_multiturn_fraction = 0.3
  # Half the single-turn dialogs carry an instruction (measured with 0.2: the SFT policy then
  # answered instruction dialogs worse, 0.39 correct at turn 1).
  c.data.world_instruction_fraction = 0.5
  c.data.world_max_turns = 20
  # No careless annotators: GAtt is about instructions, not about answer quality.
  c.data.world_careless_fraction = 0.0
  c.data.world_careless_task_fraction = 0.0
  c.data.world_careless_tasks = ""
  # SFT and the first RM pair (on the world's pairs only); no RS, no PPO.
  c.annotate.num_prompts = 0
  c.pipeline.rs_iterations = 0
  c.pipeline.ppo = False
  c.pipeline.oracle_control = False
  c.pipeline.methods = "gatt"
  # GAtt: 1,024 train dialogs of 1-20 turns sampled at T=1 with the instruction in every turn;
  # kept where the last answer follows it and is correct (~21%). Measured with 0.2 instructions
  # in SFT: keeping every following answer (66%, most of them wrong) or sampling at T=0.3 gave
  # less adherence and no better correctness.
  c.gatt.num_dialogs = 1024
  c.gatt.keep = "following_correct"
  c.gatt.max_turns = 20
  c.gatt.eval_dialogs = 64
  c.gatt.eval_turns = 20
  r = c.rejection_sampling
  r.temperature = 1.0
  r.max_new_tokens = 32
  r.batch_size = 128
  r.lr = 3e-4
  r.num_epochs = 4.0
  return c
