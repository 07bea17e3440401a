"""End to end on a tiny random Gemma 3 with the real tokenizer: training changes the adapter, the saved adapter
reproduces the trained model in a fresh process, packing keeps samples apart, and runs are never clobbered."""

import itertools
import json
import math

import pytest
import torch
from conftest import TINY_RECIPE_FLAGS, belle_rows, run_script, write_jsonl

from gemma_sft import UserError, config, outputs
from sft import main as sft_main

pytestmark = pytest.mark.train  # every test here trains a model or uses a trained one

DEMO = "recipes/gemma3_270m_belle_demo.yaml"
PROBE = "<bos><start_of_turn>user\n计算 3 加 5 等于多少？<end_of_turn>\n<start_of_turn>model\n3 + 5 = 8。"

RELOAD = """
import json, sys, torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

base, adapter, four_bit, text = sys.argv[1:5]
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32) if four_bit == "1" else None
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=quant)
model = PeftModel.from_pretrained(model, adapter)
if four_bit == "1":  # TRL trains QLoRA adapters in bf16 (after the QLoRA paper); PEFT loads them as fp32
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
# bitsandbytes' CPU eval mode repacks 4-bit weights with bf16 scales (a different rounding than training, kept
# after switching back): compare 4-bit models in train mode, with every dropout at 0
model.train(four_bit == "1")
# the saved tokenizer.json as the Rust tokenizer reads it (what transformers wraps, without seconds of set-up)
ids = torch.tensor([Tokenizer.from_file(f"{adapter}/tokenizer.json").encode(text, add_special_tokens=False).ids])
with torch.no_grad():
    print(json.dumps(model(ids).logits[0, -5:].tolist()))
"""


def probe_logits(model, tokenizer, train_mode=False):
    ids = tokenizer(PROBE, add_special_tokens=False, return_tensors="pt").input_ids
    model.train(train_mode)
    with torch.no_grad():
        return model(ids.to(model.device)).logits[0, -5:].float().cpu()


def losses_and_adapter(trainer) -> tuple[list, dict]:
    """A finished run's logged training losses and its LoRA weights (float copies)."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def train_in_process(monkeypatch, args):
    """Run sft.main in this process and keep its trainer, to compare the trained model with the saved adapter."""
    captured = {}
    original = outputs.save_adapter

    def keep_trainer(trainer, *rest):
        captured["trainer"] = trainer
        return original(trainer, *rest)

    monkeypatch.setattr(outputs, "save_adapter", keep_trainer)
    assert sft_main(args) == 0
    return captured["trainer"]


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora-fp32", "qlora-nf4"])
def test_training_changes_the_adapter_and_the_saved_adapter_reloads_identically(
    tmp_path, monkeypatch, tiny_model_dir, four_bit
):
    data = write_jsonl(tmp_path / "rows.jsonl", belle_rows(24))
    out = tmp_path / "out"
    flags = [*TINY_RECIPE_FLAGS, "--num_train_epochs", "2"]
    if four_bit:
        flags += ["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant", "true",
                  "--lora_dropout", "0", "--eval_samples", "0"]  # fmt: skip
        # (no evaluation pass: on CPU it leaves the 4-bit scales rounded to bf16, see RELOAD)
    else:  # rows padded to one shape, as the mission recipe pads them
        flags += ["--pad_to_multiple_of", "64"]
    trainer = train_in_process(
        monkeypatch,
        [DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out), *flags],
    )

    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: training moved it
    expected = probe_logits(trainer.model, trainer.processing_class, train_mode=four_bit)

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml",
                 "train_results.json", "trainer_state.json", "chat_template.jinja"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "eval_results.json").is_file() != four_bit
    assert not (out / outputs.STAGING).exists()
    assert "<end_of_turn>" in (out / "chat_template.jinja").read_text()
    metrics = json.loads((out / "train_results.json").read_text())
    assert metrics["trainable_parameters"] > 0 and metrics["train_rows"] == (24 if four_bit else 22)
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[-1] < losses[0]
    assert state["num_input_tokens_seen"] == 2 * metrics["train_tokens"]  # trained tokens, padding left out

    result = run_script("-c", RELOAD, tiny_model_dir, out, "1" if four_bit else "0", PROBE)
    assert result.returncode == 0, result.stderr
    reloaded = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(reloaded, expected, atol=1e-4, rtol=1e-4)


def test_multimodal_gemma_3_trains_its_language_model_only_and_reloads(tmp_path, monkeypatch, tiny_multimodal_dir):
    """gemma-3-4b-it's class (language model + SigLIP tower): LoRA lands on the language model only, the vision tower
    is untouched, checkpointing flags reach its decoder layers (every 2nd here), the adapter reloads."""
    data = write_jsonl(tmp_path / "rows.jsonl", belle_rows(12))
    out = tmp_path / "out"
    trainer = train_in_process(
        monkeypatch,
        [DEMO, "--model_path", str(tiny_multimodal_dir), "--data_path", str(data), "--output_dir", str(out),
         *TINY_RECIPE_FLAGS, "--eval_samples", "0", "--lora_dropout", "0", "--gradient_checkpointing", "true",
         "--gradient_checkpointing_kwargs", '{"every_n_layers": 2}', "--eval_report", "false"],
    )  # fmt: skip
    model = trainer.model
    assert type(model.get_base_model()).__name__ == "Gemma3ForConditionalGeneration"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all(".language_model.layers." in name for name in trainable)
    assert all(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)  # trained
    language_layers = model.get_base_model().model.language_model.layers
    assert sum(layer.gradient_checkpointing for layer in language_layers) == len(language_layers) // 2

    expected = probe_logits(model, trainer.processing_class)
    result = run_script("-c", RELOAD, tiny_multimodal_dir, out, "0", PROBE)
    assert result.returncode == 0, result.stderr
    reloaded = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(reloaded, expected, atol=1e-4, rtol=1e-4)


def test_keeping_some_layers_activations_learns_the_same_adapter(tmp_path, monkeypatch, tiny_model_dir):
    """Recomputing only some layers' activations in the backward pass (transformers' every_n_layers, or kept_layers,
    which `make train` sets from the card's memory) is a speed and memory trade that must not change the gradients."""
    data = write_jsonl(tmp_path / "rows.jsonl", belle_rows(12))
    adapters, flags_seen = [], []
    for kwargs in ([], ["--gradient_checkpointing_kwargs", '{"every_n_layers": 2}'], ["--kept_layers", "1"],
                   ["--kept_layers", "5"]):  # fmt: skip
        trainer = train_in_process(
            monkeypatch,
            [DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir",
             str(tmp_path / f"out{len(adapters)}"), *TINY_RECIPE_FLAGS, "--eval_samples", "0", "--lora_dropout", "0",
             "--gradient_checkpointing", "true", *kwargs, "--eval_report", "false"],
        )  # fmt: skip
        layers = trainer.model.get_base_model().model.layers
        flags_seen.append([layer.gradient_checkpointing for layer in layers])
        adapters.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n})
    assert flags_seen == [[True, True], [True, False], [True, False], [False, False]]  # 5 of 2: all kept
    assert adapters[0].keys() == adapters[1].keys() == adapters[2].keys() == adapters[3].keys()
    assert any(p.abs().sum() > 0 for n, p in adapters[0].items() if "lora_B" in n)
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(adapters[2][name], adapters[0][name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(adapters[3][name], adapters[0][name], atol=1e-6, rtol=1e-5)


def test_kept_layers_are_the_language_models_and_leave_the_vision_tower_alone():
    """gemma-3-4b-it's class has checkpointed layers in its vision tower too: kept_layers counts the language
    model's."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from gemma_sft.trainer import KeepLayerActivations

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
                                image_size=28, patch_size=14, vision_use_head=False)  # fmt: skip
    text = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, vocab_size=300)  # fmt: skip
    model = Gemma3ForConditionalGeneration(
        Gemma3Config(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            image_token_index=299,
            boi_token_index=297,
            eoi_token_index=298,
        )
    )
    model.gradient_checkpointing_enable()
    KeepLayerActivations(2).on_train_begin(None, None, None, model=model)
    assert [layer.gradient_checkpointing for layer in model.model.language_model.layers] == [True, False, True, False]
    vision_layers = [m for m in model.model.vision_tower.modules() if type(m).__name__ == "SiglipEncoderLayer"]
    assert len(vision_layers) == 6 and all(layer.gradient_checkpointing for layer in vision_layers)


def test_kept_layers_are_spread_evenly_and_checked_against_the_recipe():
    from types import SimpleNamespace

    from gemma_sft.plan import check_kept_layers
    from gemma_sft.trainer import evenly_spaced

    assert evenly_spaced(17, 34) == list(range(1, 34, 2))  # the layers every_n_layers 2 leaves unrecomputed
    assert evenly_spaced(4, 34) == [4, 12, 21, 29]
    assert evenly_spaced(1, 34) == [17]
    assert evenly_spaced(40, 34) == evenly_spaced(34, 34) == list(range(34))
    for kept, layers in ((5, 34), (13, 34), (33, 34), (7, 18), (20, 48)):
        chosen = evenly_spaced(kept, layers)
        assert len(set(chosen)) == kept and min(chosen) >= 0 and max(chosen) < layers
        gaps = [b - a for a, b in itertools.pairwise(chosen)]
        assert max(gaps) - min(gaps) <= 1

    def recipe(checkpointing=True, kwargs=None):
        return SimpleNamespace(gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=kwargs)

    assert "8 decoder layers" in check_kept_layers(recipe(kwargs={"use_reentrant": False}), 8)
    with pytest.raises(UserError, match=r"command line: --kept_layers must be 0 \(every layer recomputed\) or more"):
        config.parse(["recipes/gemma3_belle.yaml", "--kept_layers", "-1", "--dry_run"])
    for args, kept, message in (
        (recipe(checkpointing=False), 8, "needs gradient_checkpointing: true"),
        (recipe(kwargs={"every_n_layers": 2}), 8, "give one of them"),
    ):
        with pytest.raises(UserError, match=message):
            check_kept_layers(args, kept)


def test_torch_compile_compiles_decoder_layers_not_the_whole_model(tmp_path, monkeypatch, tiny_model_dir):
    """`torch_compile: true` in a recipe compiles each decoder layer once (accelerate's regional compilation)."""
    from gemma_sft import config, data, models
    from gemma_sft.trainer import build_trainer

    for name in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"):
        monkeypatch.setenv(name, "")  # TrainingArguments and sft.py set these: restore them for the next tests
        monkeypatch.delenv(name)
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(8))
    _, training_args, model_args, resolved, *_ = config.parse(
        [DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(rows), "--output_dir", str(tmp_path / "out"),
         *TINY_RECIPE_FLAGS, "--torch_compile", "true"]
    )  # fmt: skip
    tokenizer = models.load_tokenizer(str(tiny_model_dir), training_args.chat_template_path)
    trainer = build_trainer(training_args, model_args, data.prepare_from_settings(resolved, tokenizer), tokenizer)
    plugin = trainer.accelerator.state.dynamo_plugin
    assert plugin.backend.value == "INDUCTOR" and plugin.use_regional_compilation


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])  # the mission recipe uses flex_attention
@pytest.mark.parametrize("pad_to", [None, 256], ids=["unpadded", "padded"])  # padded: one shape for every row
def test_packing_keeps_each_sample_to_itself(tiny_model_dir, tokenizer, attention, pad_to):
    """Each sample's loss in a packed, padding-free batch equals its loss alone, also when the packed row is padded
    to a fixed length (`pad_to_multiple_of`); a plain causal mask would differ."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from gemma_sft.data import tokenize

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    model.eval()
    samples = []
    for row in belle_rows(3):
        encoded = tokenize(tokenizer, [{"role": "user", "content": row["instruction"]},
                                       {"role": "assistant", "content": row["output"]}])  # fmt: skip
        labels = [t if m else -100 for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])]
        samples.append({"input_ids": encoded["input_ids"], "labels": labels})

    def summed_loss(input_ids, labels, **kwargs):
        # use_cache=False as in TRL's compute_loss: with a cache object, transformers skips the per-sample mask
        logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="none")

    alone = []
    with torch.no_grad():
        for sample in samples:
            ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor([sample["labels"]])
            alone.append(summed_loss(ids, labels).sum())
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=pad_to)(samples)
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        total = sum(len(s["input_ids"]) for s in samples)
        assert batch["input_ids"].shape[1] == (pad_to or total)
        if pad_to:
            assert total < pad_to and (batch["labels"][0, total:] == -100).all()  # padding present, never learned
        packed = summed_loss(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        leaky = summed_loss(batch["input_ids"], batch["labels"])  # no position_ids: one long causal sequence

    boundaries = torch.cumsum(torch.tensor([len(s["input_ids"]) for s in samples]), 0).tolist()
    starts = [0, *boundaries[:-1]]
    per_sample = [packed[start : end - 1].sum() for start, end in zip(starts, boundaries)]
    per_sample_leaky = [leaky[start : end - 1].sum() for start, end in zip(starts, boundaries)]
    torch.testing.assert_close(torch.stack(per_sample), torch.stack(alone), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(torch.stack(per_sample_leaky[1:]), torch.stack(alone[1:]), atol=1e-3)


def test_a_finished_adapter_is_never_overwritten_by_accident(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"already holds a finished adapter.*--overwrite_output_dir true"):
        sft_main([DEMO, "--output_dir", str(out)])
    assert outputs.check_output_dir(str(out), overwrite=True) is None


def test_read_only_output_location_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="output_dir exists and is not a directory"):
        blocker = tmp_path / "file"
        blocker.write_text("x")
        outputs.check_output_dir(str(blocker), overwrite=False)


def test_non_finite_loss_stops_the_run_and_keeps_no_adapter(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", belle_rows(24))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"training stopped at step \d+: the .* became (nan|inf|NaN)"):
        sft_main([DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
                  *TINY_RECIPE_FLAGS, "--learning_rate", "1e30", "--max_grad_norm", "0",
                  "--num_train_epochs", "3"])  # fmt: skip
    assert not (out / "adapter_config.json").exists()
    for checkpoint in out.glob("checkpoint-*"):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert all(math.isfinite(entry.get("loss", 0.0)) for entry in state["log_history"])


def test_trainer_packs_the_whole_sample_at_once(tmp_path, tiny_model_dir):
    """TRL packs 1,000 samples at a time and each batch ends in a part-filled row; the trainer we build packs every
    sample in one best-fit pass, which leaves one."""
    from datasets import Dataset
    from trl import pack_dataset

    from gemma_sft import config, data, models
    from gemma_sft.trainer import build_trainer

    rows = [{"instruction": f"第 {i} 题", "input": "", "output": "好" * (5 + i * 37 % 90)} for i in range(2100)]
    args = [DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(write_jsonl(tmp_path / "rows.jsonl", rows)),
            "--output_dir", str(tmp_path / "out"), *TINY_RECIPE_FLAGS]  # fmt: skip
    _, training_args, model_args, resolved, *_ = config.parse(args)
    tokenizer = models.load_tokenizer(str(tiny_model_dir), training_args.chat_template_path)
    trainer = build_trainer(training_args, model_args, data.prepare_from_settings(resolved, tokenizer), tokenizer)
    packed = trainer.train_dataset["seq_lengths"]
    lengths = [length for row in packed for length in row]
    assert len(lengths) == 2100 - 2  # every training sample, once (2 held out)

    samples = Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    in_one_pass = pack_dataset(samples, training_args.max_length, "bfd", {"batch_size": None})
    by_thousands = pack_dataset(samples, training_args.max_length, "bfd")  # TRL's own batches
    ours, theirs = sorted(map(sum, packed)), sorted(map(sum, by_thousands["seq_lengths"]))
    assert ours == sorted(map(sum, in_one_pass["seq_lengths"]))

    def part_filled(fills):
        return sum(fill < 0.9 * training_args.max_length for fill in fills)

    assert part_filled(ours) < part_filled(theirs)  # 1 against 3: one per batch of 1,000


def test_set_up_objects_are_out_of_the_garbage_collectors_view_while_training(tmp_path, tiny_model_dir):
    """Full collections would walk every object made while loading, each time; training freezes them, then
    gives them back to the collector."""
    import gc

    from transformers import TrainerCallback

    from gemma_sft import config, data, models
    from gemma_sft.trainer import build_trainer

    class FrozenCount(TrainerCallback):
        def __init__(self):
            self.counts = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.counts.append(gc.get_freeze_count())

    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(8))
    _, training_args, model_args, resolved, *_ = config.parse(
        [DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(rows), "--output_dir", str(tmp_path / "out"),
         *TINY_RECIPE_FLAGS, "--max_steps", "2"]
    )  # fmt: skip
    tokenizer = models.load_tokenizer(str(tiny_model_dir), training_args.chat_template_path)
    probe = FrozenCount()
    before = gc.get_freeze_count()
    trainer = build_trainer(training_args, model_args, data.prepare_from_settings(resolved, tokenizer), tokenizer,
                            callbacks=[probe])  # fmt: skip
    trainer.train()
    assert len(probe.counts) == 2 and min(probe.counts) > before + 10_000  # the interpreter's heap, model included
    assert gc.get_freeze_count() == before


def test_merged_micro_batches_learn_the_same_adapter(tmp_path, monkeypatch, tiny_model_dir):
    """Unpacked rows, one per micro-batch and four accumulated, run as one padded batch of four: the same samples in
    each optimizer step and the same loss, so the same adapter; off, the micro-batches stay apart."""
    data = write_jsonl(tmp_path / "rows.jsonl", belle_rows(14))  # 3 full steps and a last step of 2 rows
    runs = []
    for merge in ("true", "false"):
        trainer = train_in_process(
            monkeypatch,
            [DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir",
             str(tmp_path / f"merge-{merge}"), *TINY_RECIPE_FLAGS, "--eval_samples", "0", "--lora_dropout", "0",
             "--packing", "false", "--gradient_accumulation_steps", "4", "--merge_micro_batches", merge,
             "--optim", "sgd", "--eval_report", "false"],
        )  # fmt: skip
        losses, adapter = losses_and_adapter(trainer)
        runs.append(
            (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps, losses, adapter)
        )
    (merged_batch, merged_accumulation, merged_losses, merged), (batch, accumulation, losses, apart) = runs
    assert (merged_batch, merged_accumulation, batch, accumulation) == (4, 1, 1, 4)
    assert len(merged_losses) == len(losses) == 4
    assert merged_losses == pytest.approx(losses, rel=1e-5)
    assert any(p.abs().sum() > 0 for n, p in apart.items() if "lora_B" in n)
    for name in apart:  # SGD, so that a weight moves in proportion to its gradient (Adam's first steps do not)
        torch.testing.assert_close(merged[name], apart[name], atol=1e-7, rtol=1e-4)


def test_merging_keeps_each_padded_batch_within_its_token_budget():
    from types import SimpleNamespace

    from gemma_sft.plan import MERGED_BATCH_TOKENS, merge_micro_batches

    def merged(accumulation, longest, batch=1, packing=False):
        args = SimpleNamespace(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                               packing=packing, pad_to_multiple_of=64)  # fmt: skip
        k = merge_micro_batches(args, longest)
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == batch * accumulation
        assert k == 1 or args.per_device_train_batch_size * -(-longest // 64) * 64 <= MERGED_BATCH_TOKENS
        return k

    assert merged(4, 830) == 4  # the original settings on Belle rows
    assert merged(16, 3000) == 4  # 16 x 3,008 would pad past the budget; 4 divides 16 and fits, 8 does not
    assert merged(6, 4000) == 3 and merged(4, 9000) == 1 and merged(8, 2000, batch=2) == 4
    assert merged(4, 830, packing=True) == 1 and merged(1, 830) == 1
