"""The first step's kernels compiled in worker processes while the model loads (speed: a first run's warm-up).

On empty kernel caches the first training step compiles about twenty Triton kernels one after another (Liger's norm,
GeGLU and rotary kernels, the LoRA dropout kernels, the output head's) and torch.compile's flex_attention forward and
backward, while the GPU waits. Here a few worker processes, started before the model loads, each run one part of a
training step on tensors of the run's widths: Liger's kernels through two decoder layers of the run's architecture
(one per layer type, random weights), flex_attention through the same layers with the packed rows' block masks, the
dropout kernels, the output head's kernel. Their kernels land in Triton's and TorchInductor's on-disk caches, where
the main process finds them on its first step. The main process waits for the workers before that step (at most
TIMEOUT_S), so their GPU memory is given back before training needs it.

Nothing here changes what is computed. A kernel a worker did not foresee (another specialisation, a failed worker)
is compiled by the main process on first use, as without the switch.

    python -m gemma_sft.patches.precompile JOB SPEC_JSON     # one worker (started by `start`)
"""

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMEOUT_S = 180  # the longest the main process waits for the workers before its first step
# The workers share the GPU with the model loading beside them (a CUDA context and up to about a GiB of tensors
# each), so they start only where this much is free: never on a card the run itself needs nearly all of
MIN_FREE_GIB = 16
last_outcome: dict | None = None  # the last joined workers' outcome in this process (the benchmark records it)


def jobs_for(text_config: dict, training_args, model_args, speed) -> dict:
    """The workers this run's first step can use, each with what it compiles for: {job: spec}."""
    # Triton specialises an integer argument on its divisibility by 16, not on its value, so a few hundred tokens
    # that divide as a pass's tokens do compile the same kernels in little memory (the workers share the GPU with
    # the model loading beside them)
    tokens = 256 + training_args.per_device_train_batch_size * training_args.max_length % 16
    widths = {key: text_config[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads", "head_dim")}
    liger = (training_args.liger_kernel_config or {}) if training_args.use_liger_kernel else None
    layers = {"liger_kernel_config": liger, "text_config": text_config,
              "qk_norm_in_stored_layout": speed.qk_norm_in_stored_layout}  # fmt: skip
    jobs = {}
    if liger is not None:
        jobs["layers"] = {"tokens": tokens, **layers}
    one_row_shape = (
        training_args.packing
        and training_args.per_device_train_batch_size == 1
        and training_args.pad_to_multiple_of == training_args.max_length
    )
    if model_args.attn_implementation == "flex_attention" and speed.cuda_graphs and one_row_shape:
        # the masks the graphed text model hands flex_attention for packed rows (packed_block_masks.py)
        jobs["attention"] = {
            "tokens": training_args.max_length, **layers, "tuned_flex_attention": speed.tuned_flex_attention,
            "block_masks_without_compile": speed.block_masks_without_compile,
        }  # fmt: skip
    dropout = model_args.lora_dropout if model_args.use_peft else 0.0
    if speed.fused_qlora and speed.lora_dropout_in_kernels and dropout > 0 and model_args.load_in_4bit:
        jobs["dropout"] = {"tokens": tokens, "rank": model_args.lora_r, "p": dropout, "into": speed.fp8_base_matmuls}
    if speed.fused_output_head:
        jobs["head"] = {"vocab": text_config["vocab_size"], "softcap": text_config.get("final_logit_softcapping")}
    for spec in jobs.values():
        spec.update(widths)
    return jobs


def text_config_of(model_path: str, revision: str | None = None) -> dict:
    """The language model's config (a multimodal checkpoint's text_config) as a dict."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path, revision=revision).get_text_config().to_dict()


class Workers:
    """The started workers; `wait` joins them (killing any past the deadline) and says how long it waited."""

    def __init__(self, processes: dict, log_dir: Path):
        self.processes, self.log_dir, self.started = processes, log_dir, time.monotonic()

    def wait(self, timeout: float = TIMEOUT_S) -> dict:
        waited_from, deadline = time.monotonic(), self.started + timeout
        outcome = {}
        for job, process in self.processes.items():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
                outcome[job] = (
                    f"done ({self._last_line(job)})" if process.returncode == 0 else f"failed ({self._last_line(job)})"
                )
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                outcome[job] = f"stopped after {timeout:.0f} s"
        self.processes = {}
        return {"jobs": outcome, "waited_s": round(time.monotonic() - waited_from, 1)}

    def _last_line(self, job: str) -> str:
        lines = (self.log_dir / f"{job}.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return lines[-1][:200] if lines else "no output"

    def kill(self) -> None:
        for process in self.processes.values():
            process.kill()


def start(jobs: dict, device_index: int = 0) -> Workers | None:
    """One worker process per job, on the main process's GPU and with its kernel caches (the environment)."""
    if not jobs:
        return None
    log_dir = Path(tempfile.mkdtemp(prefix="gemma-sft-precompile-"))
    package_root = str(Path(__file__).resolve().parents[2])  # importable wherever the run was started from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    processes = {}
    for job, spec in jobs.items():
        spec_json = json.dumps({**spec, "device": device_index})
        command = [sys.executable, "-m", "gemma_sft.patches.precompile", job, spec_json]
        with open(log_dir / f"{job}.log", "w", encoding="utf-8") as log:
            processes[job] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
    workers = Workers(processes, log_dir)
    atexit.register(workers.kill)  # never left running after the main process
    return workers


def start_for(model_path: str, training_args, model_args, speed) -> Workers | None:
    """The workers for this run, started, where the switch is on and one process trains on a GPU; else None."""
    import torch

    if not (speed.precompile_kernels and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) == 1):
        return None
    free_gib = torch.cuda.mem_get_info()[0] / 2**30
    if free_gib < MIN_FREE_GIB:
        print(f"precompile_kernels: not started, {free_gib:.1f} GiB free on the GPU (it needs {MIN_FREE_GIB})")
        return None
    jobs = jobs_for(text_config_of(model_path, model_args.model_revision), training_args, model_args, speed)
    return start(jobs, torch.cuda.current_device())


def callback(workers: Workers):
    from transformers import TrainerCallback

    class JoinWorkers(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            nonlocal workers
            if workers is None:
                return
            global last_outcome
            last_outcome, workers = workers.wait(), None
            outcome = last_outcome
            jobs = ", ".join(f"{job} {what}" for job, what in outcome["jobs"].items())
            print(f"Kernels compiled ahead (precompile_kernels): {jobs}; waited {outcome['waited_s']} s", flush=True)

    return JoinWorkers()


# The workers: each runs one part of a training step on the GPU (forward and backward), for the compiles' sake
def _tiny_model(spec: dict, attn_implementation: str):
    """A two-layer language model of the run's widths (one layer of each type), random bf16 weights on the GPU."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    types = sorted(set(spec["text_config"]["layer_types"]))
    config = Gemma3TextConfig.from_dict(
        {**spec["text_config"], "num_hidden_layers": len(types), "layer_types": types, "vocab_size": 256}
    )
    config._attn_implementation = attn_implementation
    torch.set_default_dtype(torch.bfloat16)  # a worker's own process: no float32 copy of the weights first
    with torch.device("cuda"):  # the causal LM, as Liger patches it; its text model runs below
        model = Gemma3ForCausalLM(config)
    model.train()
    return model, config


def _packed_positions(tokens: int):
    """Position ids of one packed row: three samples of different lengths."""
    import torch

    lengths = [tokens // 2, tokens // 4, tokens - tokens // 2 - tokens // 4]
    return torch.cat([torch.arange(n) for n in lengths])[None, :].cuda()


def _run_layers(spec: dict, flex: bool) -> None:
    import torch

    from gemma_sft.patches import attention

    model, config = _tiny_model(spec, "flex_attention" if flex else "sdpa")
    if spec.get("liger_kernel_config") is not None:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, **spec["liger_kernel_config"])
    if spec["qk_norm_in_stored_layout"]:  # after Liger, as in training: the layout flex_attention's inputs have
        attention.qk_norm_in_stored_layout(model)
    position_ids = _packed_positions(spec["tokens"])
    masks = None
    if flex:
        from gemma_sft.patches import block_masks
        from gemma_sft.patches.packed_block_masks import PackedBlockMasks

        if spec["tuned_flex_attention"]:
            attention.install_tuned_flex()
        if spec["block_masks_without_compile"]:
            block_masks.install()
        masks = dict(PackedBlockMasks(config, position_ids).masks)
    x = torch.randn(1, spec["tokens"], spec["hidden_size"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.model(inputs_embeds=x, position_ids=position_ids, attention_mask=masks).last_hidden_state
    out.float().square().mean().backward()


def _run_dropout(spec: dict) -> None:
    import torch

    from gemma_sft.patches import lora_dropout

    # the inputs of q/k/v and gate/up, of o_proj, of down_proj
    for width in {spec["hidden_size"], spec["num_attention_heads"] * spec["head_dim"], spec["intermediate_size"]}:
        x = torch.randn(spec["tokens"], width, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(spec["rank"], width, device="cuda", dtype=torch.bfloat16)
        seed = lora_dropout.new_seed(x.device)
        down = lora_dropout.down(x, a, spec["p"], seed)
        lora_dropout.grad_a(down, x, spec["p"], seed)
        lora_dropout.grad_x(down, a, spec["p"], seed)
        if spec["into"]:
            lora_dropout.grad_x(down, a, spec["p"], seed, into=torch.zeros_like(x))


def _run_head(spec: dict) -> None:
    import torch

    from gemma_sft.patches.output_head import _LogProbsWithForwardGradient

    vocab = 4096 + spec["vocab"] % 16  # as the tokens above: the real head's kernel without its memory
    hidden = torch.randn(64, spec["hidden_size"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, spec["hidden_size"], device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (64,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        log_probs, _, _ = _LogProbsWithForwardGradient.apply(
            hidden, weight, None, labels, 1.0, spec["softcap"], 1.0, True
        )
    log_probs.sum().backward()


def run_job(job: str, spec: dict) -> None:
    runs = {"layers": lambda: _run_layers(spec, flex=False), "attention": lambda: _run_layers(spec, flex=True),
            "dropout": lambda: _run_dropout(spec), "head": lambda: _run_head(spec)}  # fmt: skip
    if job not in runs:
        raise ValueError(f"unknown job {job!r}; one of {', '.join(runs)}")
    import torch

    torch.cuda.set_device(spec["device"])
    runs[job]()
    torch.cuda.synchronize()
    print(f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved at most", flush=True)


if __name__ == "__main__":
    run_job(sys.argv[1], json.loads(sys.argv[2]))
