"""The plan: every setting derived from the recipe and the machine, decided in one place, printed at the start of a
run and saved with it (plan.json; the derived recipe values also go into recipe.yaml, so it re-runs the same job).

The recipe says what the user asked for; the plan says what that becomes here: how unpacked rows are padded and
attended, how trained tokens are counted, how many accumulated micro-batches run as one, whether cuDNN's attention
is avoided, whether the compiler works per layer, and which patches apply.
"""

import os
from dataclasses import asdict, dataclass, field

from gemma_sft.errors import UserError

# Unpacked batches are padded to a multiple of this: few shapes (few CUDA graphs to capture), little padding, and
# never a length of 64 more than a multiple of 128, where cuDNN's attention backward can return NaN (attention.py).
UNPACKED_PAD = 128
# The most tokens one merged batch may pad to: two of the mission recipe's packed rows, which the 4B trains in
# about 11 GiB reserved (docs/PERFORMANCE.md, 16,384 tokens per step).
MERGED_BATCH_TOKENS = 16_384


@dataclass
class Plan:
    decisions: list[str] = field(default_factory=list)  # one line each, for the log
    patches: list[str] = field(default_factory=list)  # the switches of the patches this run uses
    merged_micro_batches: int = 1
    avoid_cudnn_attention: bool = False
    regional_compilation: bool = False
    fp8_matmuls: bool = False  # the frozen weights' products in FP8 (fp8_base_matmuls, where the GPU has them)

    def summary(self) -> str:
        lines = [f"  {line}" for line in self.decisions] or ["  (nothing derived: the recipe as written)"]
        return "\n".join(["Plan (derived from the recipe and this machine):", *lines,
                          f"  patches: {', '.join(self.patches) or 'none'}"])  # fmt: skip

    def as_dict(self) -> dict:
        return asdict(self)


def settle_recipe(training_args, model_args, given: set[str], resolved: dict, plan: Plan | None = None) -> Plan:
    """The part decided before any data is read: row shape and attention for unpacked training, token counting.
    `given`: the keys set on the command line, which are never overridden; `resolved` is updated to match."""
    plan = plan or Plan()
    # A packed recipe's row shape (pad_to_multiple_of 8,192) and flex_attention are for packed rows. With packing
    # off they would pad each ~300-token sample to the whole row and compile attention again for each new length, so
    # unless given on the command line, unpacked batches are padded to a multiple of UNPACKED_PAD and use sdpa.
    if not training_args.packing:
        if (training_args.pad_to_multiple_of or 0) > UNPACKED_PAD and "pad_to_multiple_of" not in given:
            training_args.pad_to_multiple_of = resolved["pad_to_multiple_of"] = UNPACKED_PAD
            plan.decisions.append(f"unpacked rows: batches padded to a multiple of {UNPACKED_PAD}, not a whole row")
        if model_args.attn_implementation == "flex_attention" and "attn_implementation" not in given:
            model_args.attn_implementation = resolved["attn_implementation"] = "sdpa"
            plan.decisions.append("unpacked rows: sdpa attention (flex_attention is for packed rows)")
    # Rows padded to one shape carry padding, so count what is trained: the real tokens. (transformers' parser reads
    # this field as a bool, so a recipe cannot ask for "non_padding" by name.)
    if training_args.include_num_input_tokens_seen == "all" and training_args.pad_to_multiple_of:
        training_args.include_num_input_tokens_seen = "non_padding"
        plan.decisions.append("trained tokens counted without padding")
    return plan


def merge_micro_batches(training_args, longest: int) -> int:
    """Run an unpacked recipe's accumulated micro-batches k at a time as one padded batch; returns k (1: unchanged).

    The optimizer steps see the same samples (the sampler's order does not depend on the batch size) and the same
    loss: transformers sums each step's token losses and divides by the step's answer tokens however the step is
    split. What changes is the host's cost per micro-step (Python and kernel launches, most of an unpacked step's
    time), paid once for k samples. k is the largest divisor of the accumulation steps whose batch, padded to the
    longest row (`longest` tokens), stays within MERGED_BATCH_TOKENS."""
    batch, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    if training_args.packing or accumulation < 2:
        return 1
    pad = training_args.pad_to_multiple_of or 1
    padded = -(-longest // pad) * pad
    fits = [
        d for d in range(1, accumulation + 1) if accumulation % d == 0 and batch * d * padded <= MERGED_BATCH_TOKENS
    ]
    k = max(fits, default=1)
    training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps = batch * k, accumulation // k
    return k


def settle_training(training_args, model_args, speed, train_lengths, plan: Plan | None = None) -> Plan:
    """The part decided once the rows are known, just before the model loads: micro-batch merging, the attention
    kernels, per-layer compilation and the patches. Applies each decision (training_args, torch, the environment)."""
    from gemma_sft import patches  # torch, Triton: only once training is certain
    from gemma_sft.patches import attention

    plan = plan or Plan()
    if speed.merge_micro_batches and train_lengths:
        plan.merged_micro_batches = merge_micro_batches(training_args, max(train_lengths))
        if plan.merged_micro_batches > 1:
            plan.decisions.append(
                f"unpacked rows: {plan.merged_micro_batches} accumulated micro-batches run as one padded batch of "
                f"{training_args.per_device_train_batch_size} (same samples and loss per optimizer step; "
                "--merge_micro_batches false keeps them apart)"
            )
    if speed.kept_layers:
        plan.decisions.append(check_kept_layers(training_args, speed.kept_layers))
    plan.avoid_cudnn_attention = attention.avoid_cudnn_attention(model_args.attn_implementation)
    if plan.avoid_cudnn_attention:
        plan.decisions.append("sdpa without cuDNN's attention kernels (NaN gradients on padded rows, attention.py)")
    if training_args.torch_compile:
        # Compile one decoder layer and reuse it for every layer (accelerate's regional compilation, which accelerate
        # reads from the environment only) rather than tracing the whole model: seconds of compilation instead of
        # minutes, and one graph per layer type.
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
        plan.regional_compilation = os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] == "true"
        if plan.regional_compilation:
            plan.decisions.append("torch.compile per decoder layer (regional compilation)")
    plan.patches = patches.applying(speed, training_args, model_args)
    if "async_steps" in plan.patches:
        _without_host_waits(training_args, plan)
    if speed.fp8_base_matmuls:
        plan.fp8_matmuls, why_not = _fp8_here(plan.patches)
        plan.decisions.append(
            "the frozen 4-bit weights' matmuls in FP8 (e4m3, a scale per row)"
            if plan.fp8_matmuls
            else f"fp8_base_matmuls: {why_not}; the frozen weights' matmuls stay in bf16"
        )
    return plan


def check_kept_layers(training_args, kept: int) -> str:
    """kept_layers' line for the plan, or a UserError where the recipe cannot use it (its range: checks.RANGES)."""
    if not training_args.gradient_checkpointing:
        raise UserError(
            f"kept_layers: {kept} needs gradient_checkpointing: true (without checkpointing every layer keeps its "
            "activations already)"
        )
    if (training_args.gradient_checkpointing_kwargs or {}).get("every_n_layers", 1) != 1:
        raise UserError(
            "kept_layers and gradient_checkpointing_kwargs' every_n_layers both choose which layers are recomputed; "
            "give one of them"
        )
    return f"{kept} decoder layers, evenly spaced, keep their activations instead of recomputing them (kept_layers)"


def _without_host_waits(training_args, plan: Plan) -> None:
    """The TrainingArguments part of async_steps (patches/async_steps.py): no wait for the GPU between steps."""
    import torch

    if training_args.logging_nan_inf_filter:
        training_args.logging_nan_inf_filter = False
        plan.decisions.append(
            "a NaN/inf loss is logged as it is, not replaced by the running mean (the filter reads every loss on the "
            "host); the run stops on it at the next log or checkpoint"
        )
    if torch.cuda.is_available() and training_args.dataloader_pin_memory:
        training_args.accelerator_config.non_blocking = True
        plan.decisions.append("batches copied to the GPU from pinned memory without blocking the host")


def _fp8_here(patches: list[str]) -> tuple[bool, str]:
    """Whether fp8_base_matmuls takes effect in this run, and if not, why."""
    import torch

    from gemma_sft.patches import fp8_matmul

    if "fused_qlora" not in patches:
        return False, "it works inside fused_qlora, which this run does not use"
    why_not = fp8_matmul.why_not(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return not why_not, why_not
