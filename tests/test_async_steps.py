"""async_steps (gemma_sft/patches/async_steps.py): a training step reads nothing back from the device, yet a run logs
and saves the figures TRL and the Trainer compute when they read them every step; the non-finite guard reads its flag
only when a step is logged, saved or evaluated, still before a checkpoint holds the damage; on a GPU, the steps
between two logs never make the host wait (torch's sync debug mode)."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RECIPE_FLAGS, belle_rows, write_jsonl
from test_train import DEMO, train_in_process
from transformers import TrainerCallback, TrainerControl

from gemma_sft import config, data, models
from gemma_sft.patches import async_steps, output_head
from gemma_sft.trainer import StopOnNonFiniteLoss, build_trainer

pytestmark = pytest.mark.train
MISSION = "recipes/gemma3_belle.yaml"
LOGGED = (
    "loss",
    "grad_norm",
    "learning_rate",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
    "num_input_tokens_seen",
)


class HostReads:
    """Counts the ways Python code reads a tensor's value back (each one waits for the device on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def tiny_trainer(tmp_path, model_dir, *flags):
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(24))
    parsed = config.parse([DEMO, "--model_path", str(model_dir), "--data_path", str(rows), "--output_dir",
                           str(tmp_path / "out"), *TINY_RECIPE_FLAGS, "--eval_samples", "0", "--lora_dropout", "0",
                           "--include_num_input_tokens_seen", "true", *flags])  # fmt: skip
    tokenizer = models.load_tokenizer(str(model_dir), parsed.training.chat_template_path)
    prepared = data.prepare_from_settings(parsed.resolved, tokenizer)
    return build_trainer(parsed.training, parsed.model, prepared, tokenizer, parsed.speed)


@pytest.mark.parametrize("packing", ["true", "false"], ids=["packed", "padded"])
def test_a_training_micro_step_reads_nothing_back_where_trl_reads_its_figures(
    tmp_path, monkeypatch, tiny_model_dir, packing
):
    trainer = tiny_trainer(tmp_path, tiny_model_dir, "--packing", packing)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    reads = HostReads(monkeypatch)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != async_steps.POSITIONS}, use_cache=False, fused_lm_head=True)
    in_the_model = reads.count  # on CPU transformers reads the packed positions to build the masks (on one GPU
    reads.count = 0  # the graphed stack builds its own, nothing read: the GPU test below)
    assert async_steps.enabled and async_steps.handles(trainer, model, return_outputs=False)
    ours = trainer.compute_loss(model, dict(batch))
    trainer._track_num_input_tokens(batch)
    assert reads.count == in_the_model
    figures = {k: list(v) for k, v in trainer._metrics["train"].items()}
    async_steps.settle(trainer)  # one read for all of them
    assert reads.count == in_the_model + 1
    settled = {k: list(v) for k, v in trainer._metrics["train"].items()}
    tokens = trainer.state.num_input_tokens_seen

    monkeypatch.setattr(async_steps, "enabled", False)  # TRL's own compute_loss and the Trainer's count
    trainer._metrics["train"].clear()
    trainer._total_train_tokens, trainer.state.num_input_tokens_seen = 0, 0
    reads.count = 0
    theirs = trainer.compute_loss(model, dict(batch))
    trainer._track_num_input_tokens(batch)
    assert reads.count >= in_the_model + 4  # the detector sees TRL's reads
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert all(isinstance(v, torch.Tensor) for k in ("entropy", "mean_token_accuracy") for v in figures[k])
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert settled[key] == pytest.approx(trainer._metrics["train"][key], rel=1e-6), key
    assert tokens == trainer.state.num_input_tokens_seen > 0


class MaskIndexing:
    """Counts indexing by a boolean mask (`hidden_states[mask]`: on a GPU the host waits for the result's size)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = torch.Tensor.__getitem__

        def counted(tensor, index):
            self.count += isinstance(index, torch.Tensor) and index.dtype == torch.bool
            return original(tensor, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", counted)


def loss_figures_and_gradients(trainer, model, batch):
    trainer._metrics["train"].clear()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    async_steps.settle(trainer)
    figures = {k: trainer._metrics["train"][k][-1] for k in ("entropy", "mean_token_accuracy")}
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), figures, gradients


@pytest.mark.parametrize("packing", ["true", "false"], ids=["packed", "padded"])
def test_the_head_keeps_the_positions_counted_on_the_host_where_trl_would_count_them_on_the_device(
    tmp_path, monkeypatch, tiny_model_dir, packing
):
    """Training batches carry the flat indices of their supervised positions (labels shifted as the head scores
    them); where TRL would keep those positions by a boolean mask on the device (its test made true, as on a GPU),
    the step uses the host's and never indexes by a mask: the same loss, figures and LoRA gradients."""
    trainer = tiny_trainer(tmp_path, tiny_model_dir, "--packing", packing)
    collate = trainer.data_collator
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer.data_collator is collate  # evaluation batches come without them
    supervised = batch["labels"][:, 1:] != -100
    assert torch.equal(batch[async_steps.POSITIONS], supervised.reshape(-1).nonzero().squeeze(1))
    assert 0 < batch[async_steps.POSITIONS].numel() < supervised.numel()

    monkeypatch.setattr(output_head, "_trl_use_triton", lambda device: True)
    base = trainer.model.get_base_model()
    fused_forward, seen = base.forward, []
    monkeypatch.setattr(base, "forward", lambda *a, **kw: seen.append(set(kw)) or fused_forward(*a, **kw))
    model = trainer.model.train()
    indexing = MaskIndexing(monkeypatch)
    ours = loss_figures_and_gradients(trainer, model, batch)
    assert indexing.count == 0 and seen and all(async_steps.POSITIONS not in keys for keys in seen)
    monkeypatch.setattr(async_steps, "enabled", False)
    theirs = loss_figures_and_gradients(trainer, model, batch)
    assert indexing.count >= 2  # TRL's hidden_states[mask] and labels[mask]
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6)
    assert ours[1] == pytest.approx(theirs[1], rel=1e-6)
    assert ours[2].keys() == theirs[2].keys() and len(ours[2]) > 10
    for name, gradient in ours[2].items():
        torch.testing.assert_close(gradient, theirs[2][name], atol=1e-7, rtol=1e-5, msg=name)


def test_positions_that_disagree_with_the_labels_stop_the_run_at_the_next_log(tmp_path, tiny_model_dir):
    trainer = tiny_trainer(tmp_path, tiny_model_dir)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    trainer.compute_loss(model, dict(batch))
    async_steps.settle(trainer)  # the batch's own positions: nothing to say
    wrong = dict(batch)
    wrong[async_steps.POSITIONS] = batch[async_steps.POSITIONS][:-1]  # one supervised position left out
    trainer.state.global_step = 6
    trainer.compute_loss(model, wrong)
    with pytest.raises(RuntimeError, match=r"differ from its labels .*step 6 or before.*--async_steps false"):
        async_steps.settle(trainer)


def test_what_a_run_logs_and_saves_is_what_it_logs_when_read_every_step(tmp_path, monkeypatch, tiny_model_dir):
    """Seven steps, a log every three and a checkpoint every four: the same log entries with the figures kept on the
    device as with TRL's reads; the checkpoint's token count counts the steps it holds; the NaN filter's read goes."""
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(24))
    runs = {}
    for value in ("true", "false"):
        out = tmp_path / value
        trainer = train_in_process(
            monkeypatch,
            [DEMO, "--model_path", str(tiny_model_dir), "--data_path", str(rows), "--output_dir", str(out),
             *TINY_RECIPE_FLAGS, "--eval_samples", "0", "--lora_dropout", "0", "--max_steps", "7",
             "--logging_steps", "3", "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "3",
             "--include_num_input_tokens_seen", "true", "--async_steps", value, "--eval_report", "false"],
        )  # fmt: skip
        logged = [
            {k: entry[k] for k in LOGGED if k in entry} for entry in trainer.state.log_history if "loss" in entry
        ]
        saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        runs[value] = (logged, saved["num_input_tokens_seen"], trainer.state.num_input_tokens_seen,
                       trainer.args.logging_nan_inf_filter)  # fmt: skip
    (ours, ours_saved, ours_total, ours_filter), (theirs, theirs_saved, theirs_total, theirs_filter) = runs.values()
    assert len(ours) == len(theirs) == 2 and all(set(entry) == set(LOGGED) for entry in ours)
    for mine, reference in zip(ours, theirs):
        assert mine["num_tokens"] == reference["num_tokens"]
        assert mine["num_input_tokens_seen"] == reference["num_input_tokens_seen"]
        assert mine == pytest.approx(reference, rel=1e-5)
    assert ours_saved == theirs_saved and 0 < ours_saved < ours_total == theirs_total
    assert (ours_filter, theirs_filter) == (False, True)


def guard_step(guard, model, step, *, log=False, save=False, max_steps=20):
    state = SimpleNamespace(global_step=step, max_steps=max_steps)
    control = TrainerControl(should_log=log, should_save=save)
    return guard.on_step_end(None, state, control, model=model)


def test_the_guard_reads_its_flag_only_at_a_log_or_checkpoint_and_names_the_first_bad_step(monkeypatch):
    model = torch.nn.Linear(4, 3)
    guard = StopOnNonFiniteLoss()
    reads = HostReads(monkeypatch)
    for step in (1, 2):
        assert not guard_step(guard, model, step).should_training_stop
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    for step in (3, 4):
        control = guard_step(guard, model, step)
        assert not control.should_training_stop and guard.tripped_at is None
    assert reads.count == 0  # four steps, nothing read back
    control = guard_step(guard, model, 5, save=True)
    assert reads.count == 1
    assert control.should_training_stop and not control.should_save  # no checkpoint of NaN weights
    assert guard.tripped_at == 5 and "at step 3" in guard.what


def test_the_guard_reads_at_the_last_step_and_passes_finite_weights(monkeypatch):
    model = torch.nn.Linear(4, 3)
    guard = StopOnNonFiniteLoss()
    assert not guard_step(guard, model, 1, log=True).should_training_stop
    with torch.no_grad():
        model.bias[0] = float("inf")
    assert guard_step(guard, model, 20).should_training_stop  # the last step: read even without a log
    assert "at step 20" in guard.what


class NoWaitsBetweenLogs(TrainerCallback):
    """Between the ends of steps `first` and `last`, any operation that makes the host wait for the GPU raises; counts
    the micro-steps whose head was handed the supervised positions counted on the host."""

    def __init__(self, monkeypatch, first: int, last: int):
        self.first, self.last, self.watching, self.positions_handed = first, last, False, 0
        scoring_positions = output_head.scoring_positions

        def counted(positions):
            self.positions_handed += self.watching
            return scoring_positions(positions)

        monkeypatch.setattr(output_head, "scoring_positions", counted)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.first, self.last):
            self.watching = state.global_step == self.first
            torch.cuda.set_sync_debug_mode("error" if self.watching else "default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="waits for the GPU are a GPU matter")
def test_on_a_gpu_the_mission_recipe_never_waits_for_the_gpu_between_logs(tmp_path, monkeypatch, tiny_multimodal_dir):
    """The mission recipe (packed rows under flex_attention, 4-bit, CUDA graphs, offloading, fused AdamW) on Gemma 3's
    multimodal model: three whole steps, with batch loading, the output head, the optimizer and the guard, never wait
    for the GPU."""
    torch._dynamo.reset()
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(200))
    parsed = config.parse([MISSION, "--model_name_or_path", str(tiny_multimodal_dir), "--dataset_name", str(rows),
                           "--output_dir", str(tmp_path / "out"), "--max_length", "512", "--pad_to_multiple_of",
                           "512", "--max_steps", "8", "--logging_steps", "100", "--save_strategy", "no",
                           "--eval_strategy", "no", "--eval_samples", "0", "--max_samples", "0",
                           "--report_to", "none"])  # fmt: skip
    tokenizer = models.load_tokenizer(str(tiny_multimodal_dir), parsed.training.chat_template_path)
    prepared = data.prepare_from_settings(parsed.resolved, tokenizer)
    guard = StopOnNonFiniteLoss()
    trainer = build_trainer(parsed.training, parsed.model, prepared, tokenizer, parsed.speed, [guard])
    watch = NoWaitsBetweenLogs(monkeypatch, 3, 6)
    trainer.add_callback(watch)
    try:
        trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.state.global_step == 8 and watch.positions_handed == 3
    assert trainer.args.accelerator_config.non_blocking and not trainer.args.logging_nan_inf_filter
