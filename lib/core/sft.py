"""trl's ``SFTTrainer`` with a training step that computes only what our runs read.

trl (1.x) computes the training loss through its chunked "fused LM head", which also
returns each token's entropy and top-1 hit, gathers them and logs their means every step.
Nothing here reads those two metrics, and on this repository's small models they are a
large share of a step: the training-overhead benchmark (``bench/``, part 1) measured
trl's step at about 0.6× the tokens/s of a hand-written loop, and about 0.75× once the
loss came from the model's own forward. The trainer also counts the model's parameters
on every step for its FLOP estimate (a walk over every parameter); the count is cached.

Everything else (tokenization, completion-only labels, collation, optimizer, schedule,
clipping, checkpoints and resuming) is trl's and transformers' own code, unchanged.
"""
from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer


class LeanSFTTrainer(SFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # transformers' causal-LM loss on the collator's labels (-100 on prompt and padding),
        # summed over tokens and divided by the tokens of the batch, as trl's own loss is.
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        if not hasattr(self, "_non_embedding_params"):
            self._non_embedding_params = self.model.num_parameters(exclude_embeddings=True)
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        return 6 * ids.numel() * self._non_embedding_params if ids is not None else 0
