"""The trainer: the base model (4-bit when the recipe asks) in TRL's SFTTrainer with the LoRA config and speed-ups."""

import gc
import math
from pathlib import Path

from transformers import TrainerCallback
from trl import SFTTrainer

from gemma_sft import UserError, outputs
from gemma_sft.patches import async_steps
from gemma_sft.plan import Plan, settle_training


class GemmaSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with a FLOP count taken once (the Trainer's own walks every parameter of the model on each
    micro-step, ~60 ms for the 4-bit 4B model, host time the GPU waits for; the count cannot change while training),
    and, with async_steps, its per-step figures kept on the GPU until a log or checkpoint reads them
    (patches/async_steps.py)."""

    def floating_point_ops(self, inputs) -> int:
        if "input_ids" not in inputs:
            return 0
        if not hasattr(self, "_non_embedding_parameters"):
            self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._non_embedding_parameters

    def get_train_dataloader(self):
        if not async_steps.enabled:
            return super().get_train_dataloader()
        collate = self.data_collator
        self.data_collator = async_steps.WithSupervisedPositions(collate)  # training batches only
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions = inputs.pop(async_steps.POSITIONS, None)
        if async_steps.handles(self, model, return_outputs):
            return async_steps.compute_loss(self, model, inputs, num_items_in_batch, positions)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _track_num_input_tokens(self, inputs):
        if async_steps.enabled and self.accelerator.num_processes == 1:
            return async_steps.track_input_tokens(self, inputs)
        return super()._track_num_input_tokens(inputs)

    def log(self, logs, start_time=None):
        async_steps.settle(self)
        return super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        async_steps.settle(self)  # the token count goes into trainer_state.json
        return super()._save_checkpoint(model, trial)


def evenly_spaced(kept: int, layers: int) -> list[int]:
    """`kept` of `layers` layer indices, spread evenly (the middle of each of `kept` equal spans); all when kept >=
    layers. Half of 34 gives the odd layers, the ones every_n_layers 2 leaves unrecomputed."""
    kept = min(kept, layers)
    return [int((i + 0.5) * layers / kept) for i in range(kept)]


class KeepLayerActivations(TrainerCallback):
    """kept_layers: once the Trainer has turned gradient checkpointing on, turn it off again for that many decoder
    layers, evenly spaced (transformers' own per-layer flag, as its every_n_layers sets it). Runs before the
    patches' per-model parts, which look at that flag (keep_mlp_outputs, offload_activations)."""

    def __init__(self, kept: int):
        self.kept = kept

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel

        # the language model's layers only: a multimodal model's vision tower has checkpointed layers too (27 in
        # gemma-3-4b-it's), which text training never runs
        layers = [layer for m in model.modules() if isinstance(m, Gemma3TextModel) for layer in m.layers]
        chosen = evenly_spaced(self.kept, len(layers))
        for index in chosen:
            layers[index].gradient_checkpointing = False
        print(
            f"kept_layers: {len(chosen)} of {len(layers)} decoder layers keep their activations "
            f"({', '.join(map(str, chosen))}); the rest are recomputed in the backward pass",
            flush=True,
        )


class FreezeSetUpObjects(TrainerCallback):
    """Keep the objects made while setting up (model modules, tokenizer, tokenized rows) out of Python's garbage
    collector while training: they live to the end anyway, and each full collection walked them all, about half a
    second of one step in fifteen on the 4B. Unfrozen when training ends."""

    def on_train_begin(self, args, state, control, **kwargs):
        gc.collect()
        gc.freeze()

    def on_train_end(self, args, state, control, **kwargs):
        gc.unfreeze()


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop on a NaN/inf loss or LoRA weight, before a checkpoint holds it. The weights' norm is taken on the GPU
    each step and the first step where it is not finite is kept there; the host reads it only when the step will be
    logged, saved or evaluated, or is the last, so that the check never makes the host wait for the GPU in between."""

    def __init__(self):
        self.tripped_at: int | None = None
        self.what = ""
        self._first_bad = None  # on the weights' device: the first step whose weights were not finite, or -1

    def _trip(self, state, control, what):
        self.tripped_at, self.what = state.global_step, what
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch

        weights = [p.detach() for p in model.parameters() if p.requires_grad]
        if weights:
            finite = torch.isfinite(torch.nn.utils.get_total_norm(weights))
            if self._first_bad is None:
                self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
            self._first_bad = torch.where(finite | (self._first_bad >= 0), self._first_bad, state.global_step)
        read_now = control.should_save or control.should_log or control.should_evaluate
        if self._first_bad is not None and (
            read_now or control.should_training_stop or state.global_step >= state.max_steps
        ):
            first_bad = int(self._first_bad)
            if first_bad >= 0:
                self._trip(state, control, f"the LoRA weights became NaN/inf at step {first_bad}")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self._trip(state, control, f"the {key.replace('_', ' ')} became {value}")
        return control

    def raise_if_tripped(self, output_dir: str) -> None:
        if self.tripped_at is None:
            return
        last = outputs.last_complete_checkpoint(Path(output_dir))
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise UserError(
            f"training stopped at step {self.tripped_at}: {self.what}; {kept}. "
            "Lower learning_rate or max_grad_norm, check the data, and never train Gemma 3 in fp16"
        )


def build_trainer(
    training_args, model_args, prepared, tokenizer, speed=None, callbacks=(), plan: Plan | None = None
) -> GemmaSFTTrainer:
    """The trainer for a recipe's parsed arguments and prepared rows; `speed` (SpeedArguments, default: every switch
    on) picks the patches (gemma_sft/patches/registry.py). The plan's last decisions are settled here (plan.py) and
    added to `plan` when one is given."""
    from trl import get_peft_config

    from gemma_sft import models, patches
    from gemma_sft.config import SpeedArguments

    speed = speed or SpeedArguments()
    settle_training(training_args, model_args, speed, prepared.train_lengths, plan)
    speed_callbacks = patches.install(speed, training_args, model_args)
    kept = [KeepLayerActivations(speed.kept_layers)] if speed.kept_layers else []  # before the patches' callbacks
    model = models.load_model(models.resolve_model(model_args.model_name_or_path), model_args, tokenizer)
    return GemmaSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=prepared.train,  # memory-mapped Arrow rows: no second copy in memory
        eval_dataset=prepared.eval if len(prepared.eval) else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[*callbacks, *kept, *speed_callbacks, FreezeSetUpObjects()],
    )
