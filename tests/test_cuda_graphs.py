"""CUDA graphs for training (patches/cuda_graphs.py): where they apply, that the packed rows' block masks kept in place
allow exactly what transformers' masks allow, and on a GPU that replayed graphs compute what the eager model computes,
dropout, gradient checkpointing and packed rows under flex_attention included."""

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RECIPE_FLAGS, belle_rows, write_jsonl
from test_train import DEMO, losses_and_adapter, train_in_process

from gemma_sft import UserError, patches
from gemma_sft.patches import async_steps, attention, cuda_graphs
from gemma_sft.patches.packed_block_masks import PackedBlockMasks, sequence_numbers

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def GPU(test):
    """A test that trains on a GPU: skipped without one, and left out of the fast tier."""
    return pytest.mark.train(NEEDS_GPU(test))


def test_graphs_apply_to_unpacked_training_in_one_process_on_a_gpu(monkeypatch):
    def applies(packing=False, gpu=True, world_size="1", compiled=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setenv("WORLD_SIZE", world_size)
        args = SimpleNamespace(packing=packing, torch_compile=compiled)
        return patches.BY_SWITCH["cuda_graphs"].applies(None, args, None)

    assert applies()
    assert applies(packing=True)
    assert not applies(gpu=False)
    assert not applies(world_size="2")
    assert not applies(compiled=True)


def packed_positions(*lengths, total):
    """position_ids of one packed row as TRL's padding-free collator makes them: each sample from 0, then zeros."""
    positions = torch.cat([torch.arange(n) for n in lengths])
    return torch.cat([positions, torch.zeros(total - len(positions), dtype=torch.long)])[None]


def _transformers_masks(config, position_ids, monkeypatch):
    """The flex_attention masks transformers builds for a packed batch with no attention mask."""
    from transformers import masking_utils

    build = masking_utils.create_block_mask
    # eagerly on the CPU (transformers compiles the builder; the masks are the same)
    monkeypatch.setattr(masking_utils, "create_block_mask", lambda *a, **k: build(*a, **{**k, "_compile": False}))
    kwargs = dict(config=config, inputs_embeds=torch.empty(*position_ids.shape, 1), attention_mask=None,
                  past_key_values=None, position_ids=position_ids)  # fmt: skip
    return {
        "full_attention": masking_utils.create_causal_mask(**kwargs),
        "sliding_attention": masking_utils.create_sliding_window_causal_mask(**kwargs),
    }


def test_sequence_numbers_start_a_sequence_wherever_positions_restart():
    positions = packed_positions(3, 2, 4, total=12)
    assert sequence_numbers(positions).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 5]]  # each padding token alone


@pytest.mark.parametrize("rows", [1, 2])
def test_packed_block_masks_allow_exactly_what_transformers_masks_allow_and_refill_in_place(tiny_model_dir, rows,
                                                                                            monkeypatch):  # fmt: skip
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config._attn_implementation = "flex_attention"
    assert config.sliding_window < 100 and set(config.layer_types) == {"full_attention", "sliding_attention"}
    first = torch.cat([packed_positions(100, 300, 37, total=512), packed_positions(512, total=512)][:rows])
    second = torch.cat([packed_positions(250, 200, 62, total=512), packed_positions(7, 400, total=512)][:rows])

    packed = PackedBlockMasks(config, first)
    assert packed.matches(_transformers_masks(config, first, monkeypatch)) is None
    storage = {name: [getattr(mask, f).data_ptr() for f in ("kv_indices", "full_kv_indices")]
               for name, mask in packed.masks.items()}  # fmt: skip
    sequences = packed.sequences.data_ptr()

    refilled = packed.refill(second)
    assert refilled is packed.masks and packed.sequences.data_ptr() == sequences
    assert storage == {name: [getattr(mask, f).data_ptr() for f in ("kv_indices", "full_kv_indices")]
                       for name, mask in refilled.items()}  # fmt: skip
    assert packed.matches(_transformers_masks(config, second, monkeypatch)) is None
    # the check can fail: the first batch's masks are not the second's
    assert "query tokens 0-511 see other keys" in packed.matches(_transformers_masks(config, first, monkeypatch))


def test_both_layer_types_attend_through_one_compiled_flex_attention(tiny_model_dir):
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    packed = PackedBlockMasks(config, packed_positions(100, 300, 37, total=512))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 16) for _ in range(3))
    expected = {name: flex_attention(q, k, v, block_mask=mask) for name, mask in packed.masks.items()}
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(flex_attention, backend="eager", fullgraph=True)  # dynamo's guards, no kernel build
    for name, mask in packed.masks.items():
        torch.testing.assert_close(compiled(q, k, v, block_mask=mask), expected[name])
    # a second graph would be a second flex_attention kernel to build on a GPU's first step
    assert len(packed.masks) == 2 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def tiny_lora_model(model_dir, device, dropout, four_bit, attention="sdpa"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16) if four_bit else None  # fmt: skip
    dtype = torch.bfloat16 if four_bit else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quantization,
                                                 attn_implementation=attention)  # fmt: skip
    model.to(device)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                                             init_lora_weights=False))  # fmt: skip
    model.train()
    return model


def padded_batch(device):
    torch.manual_seed(1)
    input_ids = torch.randint(3, 1000, (3, 48), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0  # padded rows, so that the masks are real tensors
    attention_mask[2, 12:] = 0
    return input_ids, attention_mask


def loss_and_grads(model, input_ids, attention_mask, seed):
    model.zero_grad(set_to_none=True)
    torch.cuda.manual_seed(seed) if input_ids.is_cuda else torch.manual_seed(seed)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = (logits.float().log_softmax(-1)[..., 5] * attention_mask).sum() / attention_mask.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_loss_and_grads(model, input_ids, position_ids, seed):
    """One packed micro-step as TRL's padding-free batches give it: positions, no attention mask, flash-only hints."""
    model.zero_grad(set_to_none=True)
    torch.cuda.manual_seed(seed)
    hints = {"cu_seq_lens_q": torch.tensor([0, position_ids.shape[1]], device=input_ids.device), "max_length_q": 1}
    logits = model(input_ids=input_ids, position_ids=position_ids, **hints).logits
    loss = logits.float().log_softmax(-1)[..., 5].mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def graphed_stacks(model) -> list:
    forwards = [module.__dict__.get("forward") for module in model.modules()]
    return [forward for forward in forwards if isinstance(forward, cuda_graphs.GraphedStack)]


@GPU
@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_multimodal_dir"])
def test_packed_rows_under_flex_attention_replay_what_eager_steps_compute(model_fixture, request, monkeypatch):
    """Packed rows of one shape with other packings each step: the replays read each batch's masks (refilled in
    place), so every replay matches the eager step on that batch; the text-only model builds no masks; the multimodal
    wrapper builds its own for the first batch (checked against ours), then is handed ours (hand_down_masks)."""
    torch._dynamo.reset()  # flex_attention compiled afresh: past tests' recompilations count towards dynamo's limit
    patches.enable("fused_qlora")
    patches.enable("tuned_flex_attention")
    monkeypatch.setattr(async_steps, "enabled", True)  # the multimodal body's masks handed down (hand_down_masks)
    model = tiny_lora_model(request.getfixturevalue(model_fixture), "cuda", dropout=0.3, four_bit=True,
                             attention="flex_attention")  # fmt: skip
    torch.manual_seed(4)
    input_ids = torch.randint(3, 1000, (1, 512), device="cuda")
    packings = [packed_positions(100, 300, 37, total=512), packed_positions(250, 200, 62, total=512),
                packed_positions(512, total=512)]  # fmt: skip
    eager = [packed_loss_and_grads(model, input_ids, p.cuda(), seed=9) for p in packings]
    assert eager[0][0] != eager[1][0]  # another packing, another loss

    assert cuda_graphs.graph_text_models(model) == 1
    (stack,) = graphed_stacks(model)
    packed_loss_and_grads(model, input_ids, packings[1].cuda(), seed=3)  # captures (its warm-up passes draw dropout)
    assert len(stack.captured) == 1 and stack.replays == 1
    for _ in range(2):
        for positions, (eager_loss, eager_grads) in zip(packings, eager):
            loss, grads = packed_loss_and_grads(model, input_ids, positions.cuda(), seed=9)
            torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-4)
            assert grads.keys() == eager_grads.keys()
            for name in eager_grads:
                torch.testing.assert_close(grads[name], eager_grads[name], rtol=2e-2, atol=1e-3)
    assert stack.failed is None and stack.unmatched is None
    assert len(stack.captured) == 1 and len(stack.packed_masks) == 1 and stack.replays == 7
    assert stack.handed_down == (6 if model_fixture == "tiny_multimodal_dir" else 0)


def test_off_a_gpu_the_wrapped_model_computes_what_it_computed(tiny_model_dir):
    model = tiny_lora_model(tiny_model_dir, "cpu", dropout=0.0, four_bit=False)
    batch = padded_batch("cpu")
    loss, grads = loss_and_grads(model, *batch, seed=0)
    assert cuda_graphs.graph_text_models(model) == 1
    stack = model.base_model.model.model.forward
    graphed_loss, graphed_grads = loss_and_grads(model, *batch, seed=0)
    assert stack.captured == {} and stack.replays == 0  # tensors on the CPU: the model's own forward
    assert graphed_loss == loss and graphed_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(graphed_grads[name], grads[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "failure, raised",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 320.00 MiB."), torch.OutOfMemoryError),
        (RuntimeError("operation not permitted when stream is capturing"), UserError),
    ],
)
def test_a_capture_out_of_memory_is_reported_as_such_and_other_failures_name_the_switch(
    tiny_model_dir, monkeypatch, failure, raised
):
    """Running out of memory while capturing is the step's size, not the graphs: it reaches the entry script's
    out-of-memory line (what uses less); an operation that cannot be captured says to turn the graphs off."""

    def failing_capture(*args, **kwargs):
        raise failure

    model = tiny_lora_model(tiny_model_dir, "cpu", dropout=0.0, four_bit=False)
    assert cuda_graphs.graph_text_models(model) == 1
    stack = model.base_model.model.model.forward
    monkeypatch.setattr(cuda_graphs, "_Captured", failing_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    with pytest.raises(raised) as error:
        stack.capture("key", [torch.zeros(1, 8, dtype=torch.long), None], True, [])
    if raised is UserError:
        assert "--cuda_graphs false" in str(error.value) and "operation not permitted" in str(error.value)
        assert stack.failed.startswith("RuntimeError: operation not permitted")
    else:
        assert error.value is failure and stack.failed is None
    assert stack.captured == {}


@GPU
def test_replays_match_eager_steps_with_dropout_and_recomputation(tiny_model_dir):
    """The same random stream gives the replayed graphs the dropout masks of the eager pass, also in the checkpointed
    layers' recomputation; the first call captures, later calls of that shape replay, a new shape captures again."""
    patches.enable("fused_qlora")
    model = tiny_lora_model(tiny_model_dir, "cuda", dropout=0.3, four_bit=True)
    batch = padded_batch("cuda")
    eager_loss, eager_grads = loss_and_grads(model, *batch, seed=7)
    other_loss, _ = loss_and_grads(model, *batch, seed=8)
    assert other_loss != eager_loss  # dropout is drawn: another seed, another loss

    assert cuda_graphs.graph_text_models(model) == 1
    stack = model.base_model.model.model.forward
    loss_and_grads(model, *batch, seed=3)  # captures
    assert len(stack.captured) == 1 and stack.replays == 1 and stack.failed is None
    for _ in range(2):
        graphed_loss, graphed_grads = loss_and_grads(model, *batch, seed=7)
        torch.testing.assert_close(graphed_loss, eager_loss, rtol=1e-3, atol=1e-4)
        assert graphed_grads.keys() == eager_grads.keys()
        for name in eager_grads:
            torch.testing.assert_close(graphed_grads[name], eager_grads[name], rtol=2e-2, atol=1e-3)
    assert len(stack.captured) == 1 and stack.replays == 3

    shorter = tuple(t[:, :40] for t in batch)
    loss_and_grads(model, *shorter, seed=7)
    assert len(stack.captured) == 2

    with torch.no_grad():  # no gradients (evaluation): the model's own forward
        model(input_ids=batch[0], attention_mask=batch[1])
    model.eval()
    model(input_ids=batch[0], attention_mask=batch[1])
    assert stack.replays == 4


def train_both_ways(tmp_path, monkeypatch, model_dir, rows: int, flags: list, switch: str = "cuda_graphs") -> list:
    """sft.py with QLoRA, checkpointing, SGD and no dropout on the same rows, `switch` on then off: for each run its
    graphed stacks, losses, adapter, optimizer steps and trainer."""
    data = write_jsonl(tmp_path / "rows.jsonl", belle_rows(rows))
    runs = []
    for value in ("true", "false"):
        trainer = train_in_process(
            monkeypatch,
            [DEMO, "--model_path", str(model_dir), "--data_path", str(data), "--output_dir",
             str(tmp_path / f"{switch}-{value}"), *TINY_RECIPE_FLAGS, "--eval_samples", "0", "--lora_dropout", "0",
             "--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--dtype", "bfloat16", "--bf16", "true",
             *flags, "--num_train_epochs", "3", "--gradient_checkpointing", "true", f"--{switch}", value,
             "--optim", "sgd", "--eval_report", "false"],
        )  # fmt: skip
        runs.append((graphed_stacks(trainer.model), *losses_and_adapter(trainer), trainer.state.global_step, trainer))
    return runs


@GPU
def test_graphed_training_learns_what_eager_training_learns(tmp_path, monkeypatch, tiny_model_dir):
    """sft.py on unpacked rows with QLoRA, checkpointing and accumulation: the same losses and adapter with graphs
    as without (SGD, no dropout), and the graphs were replayed, not only captured."""
    unpacked = ["--packing", "false", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    runs = train_both_ways(tmp_path, monkeypatch, tiny_model_dir, 16, unpacked)
    (stacks, graphed_losses, graphed, *_), (no_stacks, losses, eager, *_) = runs
    assert no_stacks == [] and len(stacks) == 1 and stacks[0].failed is None
    assert len(stacks[0].captured) >= 1 and stacks[0].replays > len(stacks[0].captured)
    assert graphed_losses == pytest.approx(losses, rel=2e-3)
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], rtol=2e-2, atol=1e-4)


@GPU
def test_packed_graphed_training_learns_what_eager_training_learns(tmp_path, monkeypatch, tiny_model_dir):
    """sft.py on packed rows of one shape under flex_attention, QLoRA and checkpointing: the same losses and adapter
    with graphs as without (SGD, no dropout), every step after the first a replay."""
    torch._dynamo.reset()
    packed = ["--packing", "true", "--max_length", "512", "--pad_to_multiple_of", "512", "--attn_implementation",
              "flex_attention"]  # fmt: skip
    runs = train_both_ways(tmp_path, monkeypatch, tiny_model_dir, 24, packed)
    (stacks, graphed_losses, graphed, steps, _), (no_stacks, losses, eager, *_) = runs
    assert no_stacks == [] and len(stacks) == 1 and stacks[0].failed is None and stacks[0].unmatched is None
    assert len(stacks[0].captured) == 1 and stacks[0].replays == steps > 3
    assert graphed_losses == pytest.approx(losses, rel=2e-3)
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], rtol=2e-2, atol=1e-4)


@GPU
def test_padded_batches_with_rows_that_attend_to_nothing_train_to_finite_gradients(tiny_model_dir):
    """A padded batch 64 tokens longer than a multiple of 128 whose short row leaves padding positions with no key in
    their sliding window: the case where cuDNN's attention backward returned NaN (attention.avoid_cudnn_attention).
    Finite gradients eagerly and through the graphs, and the same ones."""
    attention.avoid_cudnn_attention("sdpa")
    patches.enable("fused_qlora")
    model = tiny_lora_model(tiny_model_dir, "cuda", dropout=0.0, four_bit=True)
    torch.manual_seed(2)
    input_ids = torch.randint(3, 1000, (2, 576), device="cuda")
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 40:] = 0  # sliding window 8: positions past 47 of row 2 see only padding
    eager_loss, eager_grads = loss_and_grads(model, input_ids, attention_mask, seed=0)
    assert torch.isfinite(eager_loss) and all(torch.isfinite(g).all() for g in eager_grads.values())
    cuda_graphs.graph_text_models(model)
    for _ in range(2):  # capture, then replay
        loss, grads = loss_and_grads(model, input_ids, attention_mask, seed=0)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-4)
        for name in eager_grads:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=2e-2, atol=1e-3)
