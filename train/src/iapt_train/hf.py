"""Hugging Face `Trainer` integration: a callback that writes the spec v1 adapter into every
checkpoint directory the Trainer saves."""

from __future__ import annotations

import os

from transformers import TrainerCallback


class IaptCheckpointCallback(TrainerCallback):
    """`Trainer(..., callbacks=[IaptCheckpointCallback()])`: at each checkpoint the Trainer saves
    (`save_strategy`), also writes `checkpoint-{step}/adapter.iapt.safetensors` (and
    `iapt_train.json`) with `IaptModel.save_pretrained`, so every checkpoint can be validated and
    served as it is. (The Trainer's own `model.safetensors` holds `IaptModel.state_dict()`: the
    generators only.)

    Args:
        dtype: of the saved matrices (`save_pretrained`'s `dtype`).
    """

    def __init__(self, dtype="float32"):
        self.dtype = dtype

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not state.is_world_process_zero:
            return
        inner = getattr(model, "module", model)
        inner.save_pretrained(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), dtype=self.dtype)
