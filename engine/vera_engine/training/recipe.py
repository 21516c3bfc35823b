"""Vera's training recipe constants (paper §4.1.1, Table 5), importable without torch (the CLI shows them)."""

# Per-branch multipliers of the base learning rate: the edit branch stays close to the pretrained video prior,
# alpha and composite (new outputs) move fast.
DEFAULT_BRANCH_LR_SCALES: dict[str, float] = {"edit": 0.1, "alpha": 10.0, "composite": 10.0}
# Probability of training without the mask, per task: object addition is mostly asked for without a mask.
DEFAULT_MASK_DROPOUT: dict[str, float] = {"object_addition": 0.9, "background_change": 0.3}
