"""Training steps that the host issues without waiting for the GPU.

The host can queue the next step's work while the GPU is still busy only if nothing in between waits for the GPU, and
each wait leaves the GPU idle for the host time that follows it (Python, launches, the next batch). TRL's and the
Trainer's bookkeeping waits several times per micro-step: SFTTrainer.compute_loss reads its entropy, token accuracy
and token count (`.item()`, `num_valid > 0`), the Trainer reads the number of input tokens, and its NaN filter reads
the loss. Each is a figure for the log, not an input to the step.

Here, on one process, those figures stay on the GPU, are summed there, and are read in one transfer when the Trainer
logs or saves a checkpoint (`settle`). The rest of what this switch turns on is TrainingArguments, set by the plan
(plan.py): batches are copied to the GPU without blocking (accelerate's non_blocking, from pinned memory), and the NaN
filter of the logged loss is off, so a non-finite loss shows in the log and trainer.StopOnNonFiniteLoss stops the run
at the next log or checkpoint, before the checkpoint is written. On Gemma 3's multimodal model, whose body builds the
packed block masks each step (reading the positions back) for cuda_graphs to compare with its own (reading again),
the body is handed the graphed stack's masks instead (cuda_graphs.hand_down_masks). TRL's fused head keeps only the
supervised positions, which the host would wait to count; the training batches carry them, counted on the host when
the batch is built (`WithSupervisedPositions`), and the head is handed them (output_head.scoring_positions; with
TRL's own head the wait stays). Each step checks on the GPU that they match its labels, and `settle` stops the run
if one did not. The figures and the training are the same.
"""

import os

import torch

from gemma_sft.patches import output_head

enabled = False
POSITIONS = "supervised_positions"  # the batch key the positions travel under, removed before the model sees the batch


class WithSupervisedPositions:
    """A collator's batches with the flat indices of their supervised positions (labels shifted by one, as TRL's fused
    head scores them) added, counted on the host."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        batch = self.collate(examples)
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and "shift_labels" not in batch:
            batch[POSITIONS] = (labels[:, 1:] != -100).reshape(-1).nonzero().squeeze(1)
        return batch


def install() -> None:
    global enabled
    enabled = True


def uninstall() -> None:
    global enabled
    enabled = False


def applies(speed, training_args, model_args) -> bool:
    # several processes gather their figures across ranks: TRL's own path does that
    return int(os.environ.get("WORLD_SIZE", "1")) == 1


def handles(trainer, model, return_outputs: bool) -> bool:
    """Whether `compute_loss` below is TRL's computation for this call: training, the plain token loss, one process.
    Anything else (evaluation, a custom loss, label smoothing, an auxiliary loss, the outputs wanted) goes to TRL."""
    return (
        enabled
        and model.training
        and not return_outputs
        and trainer.compute_loss_func is None
        and trainer.label_smoother is None
        and not trainer.aux_loss_enabled
        and trainer.args.loss_type in ("nll", "dft")
        and trainer.accelerator.num_processes == 1
    )


def compute_loss(trainer, model, inputs: dict, num_items_in_batch=None, positions=None) -> torch.Tensor:
    """TRL 1.16's SFTTrainer.compute_loss for one training micro-step on one process, its metrics left on the GPU;
    `positions`, where the batch brought them, spare the head its count."""
    inputs["use_cache"] = False
    if positions is not None and output_head.installed():
        with output_head.scoring_positions(positions):
            outputs = model(**inputs, fused_lm_head=True)
        labelled = outputs.label_mask.reshape(-1)
        differs = (torch.zeros_like(labelled).index_fill_(0, positions, True) != labelled).any()
        trainer._positions_differ = differs | getattr(trainer, "_positions_differ", False)
    else:
        outputs = model(**inputs, fused_lm_head=True)
    per_token_loss = -outputs.log_probs  # zero on ignored positions
    if trainer.args.loss_type == "dft":
        per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
    num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)

    # TRL's figures: the mean entropy and top-1 accuracy over the supervised tokens, 0 where there are none
    num_valid = outputs.label_mask.sum()
    has_valid, per_valid = num_valid > 0, 1 / num_valid.clamp(min=1)
    metrics = trainer._metrics["train"]
    metrics["entropy"].append(torch.where(has_valid, outputs.entropy.detach().sum() * per_valid, 0.0))
    metrics["mean_token_accuracy"].append(torch.where(has_valid, outputs.is_top1.sum() * per_valid, 0.0))
    if "attention_mask" in inputs:
        trainer._total_train_tokens = trainer._total_train_tokens + inputs["attention_mask"].sum()
    else:  # padding-free rows: TRL counts their length, known on the host
        trainer._total_train_tokens += inputs["position_ids"].size(1)
    metrics["num_tokens"] = [trainer._total_train_tokens]
    return loss


def track_input_tokens(trainer, inputs: dict) -> None:
    """The Trainer's count of input tokens (include_num_input_tokens_seen), added up on the GPU until `settle`."""
    mode = trainer.args.include_num_input_tokens_seen
    if mode == "no":
        return
    input_ids = inputs[getattr(trainer.model, "main_input_name", "input_ids")]
    pad_id = getattr(trainer.processing_class, "pad_token_id", None)
    if mode != "non_padding":
        count = input_ids.numel()
    elif "attention_mask" in inputs:
        count = inputs["attention_mask"].sum()
    elif pad_id is not None:
        count = (input_ids != pad_id).sum()
    else:
        count = input_ids.numel()
    pending = getattr(trainer, "_input_tokens_pending", 0)
    trainer._input_tokens_pending = pending + count


def settle(trainer) -> None:
    """Read every figure still on the GPU in one transfer: TRL's metrics and token count, the input tokens seen."""
    places = []  # (list or None, index or attribute name)
    for values in trainer._metrics["train"].values():
        places += [(values, i) for i, value in enumerate(values) if isinstance(value, torch.Tensor)]
    for name in ("_total_train_tokens", "_input_tokens_pending", "_positions_differ"):
        if isinstance(getattr(trainer, name, None), torch.Tensor):
            places.append((None, name))
    if places:
        tensors = [holder[i] if holder is not None else getattr(trainer, i) for holder, i in places]
        numbers = torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist()
        for (holder, i), number, tensor in zip(places, numbers, tensors):
            number = number if tensor.is_floating_point() else int(number)
            if holder is not None:
                holder[i] = number
            else:
                setattr(trainer, i, number)
    trainer.state.num_input_tokens_seen += getattr(trainer, "_input_tokens_pending", 0)
    trainer._input_tokens_pending = 0
    if getattr(trainer, "_positions_differ", False):
        raise RuntimeError(
            f"async_steps: a batch's supervised positions, counted when it was built, differ from its labels on the "
            f"device (step {trainer.state.global_step} or before): its loss is wrong; train with --async_steps false"
        )
    trainer._positions_differ = False
