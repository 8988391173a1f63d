"""Training wrappers over TRL: SFT (:mod:`.sft`), RFT/GRPO (:mod:`.rft`), RFT-simulated rollouts
(:mod:`.rollouts`), run folders and checkpoints (:mod:`.run`), callbacks (:mod:`.callbacks`) and checkpoint
schedules (:mod:`.schedules`).

Import from the submodules (``from dynamics.train.sft import SFTRunConfig, train_sft``); importing this package
loads nothing heavy.
"""
