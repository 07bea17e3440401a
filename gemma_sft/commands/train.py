"""QLoRA instruction fine-tuning of Gemma 3 from a YAML recipe.

    accelerate launch sft.py recipes/gemma3_belle.yaml                 # the mission: gemma-3-4b-it on 2,000 Belle rows
    python sft.py recipes/gemma3_270m_belle_demo.yaml                  # embedded Gemma 3 270M, CPU-friendly demo
    python sft.py recipes/gemma3_belle.yaml --data_path my.jsonl --dry_run   # check your data before paying for a GPU

Every recipe key is a TRL field name (ScriptArguments, SFTConfig, ModelConfig) or one of our data, run and speed
fields (gemma_sft/config.py); flags override the recipe. The original tool's --model_path, --data_path, --epochs,
--batch_size and --output_path still work.
"""

import contextlib
import json
import os


def main(argv: list[str] | None = None) -> int:
    from gemma_sft import config, outputs

    recipe = config.parse(argv)
    # One run per output folder: held from before anything is written there to the end (by the first process)
    holding = not recipe.run.dry_run and os.environ.get("RANK", "0") == "0"
    with outputs.run_lock(recipe.training.output_dir) if holding else contextlib.nullcontext():
        return _run(recipe)


def _run(recipe) -> int:
    from gemma_sft import config, data, hardware, models, outputs, resume
    from gemma_sft.trainer import StopOnNonFiniteLoss, build_trainer

    ################
    # Recipe
    ################
    training_args, model_args, run_args = recipe.training, recipe.model, recipe.run
    hardware.check_precision(training_args, model_args)
    if not run_args.dry_run:
        resume_from = outputs.check_output_dir(training_args.output_dir, run_args.overwrite_output_dir)
        resumed_with = resume.check_settings(recipe, resume_from)  # refuses settings changed since the run started
        hardware.check_launch(model_args, training_args)
        hardware.check_processes(training_args)

    ################
    # Data: rows -> Gemma chat messages -> token ids with the answer mask
    ################
    tokenizer_path = models.resolve_tokenizer(model_args.model_name_or_path)
    tokenizer = models.load_tokenizer(tokenizer_path, training_args.chat_template_path)
    prepared = data.prepare_from_settings(recipe.resolved, tokenizer)
    summary, stats = data.summarize(prepared, tokenizer)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process under accelerate launch
        print(summary, flush=True)
    if run_args.dry_run:
        print(json.dumps(stats, ensure_ascii=False))
        return 0

    ################
    # Model and trainer: TRL packs, collates and trains; PEFT adds LoRA on the language model only
    ################
    outputs.create_output_dir(training_args.output_dir, run_args.overwrite_output_dir)
    if not resume_from:
        resume.record_start(training_args.output_dir, recipe.resolved)
    guard = StopOnNonFiniteLoss()
    trainer = build_trainer(training_args, model_args, prepared, tokenizer, recipe.speed, [guard], recipe.plan)
    trainer.accelerator.print(recipe.plan.summary())
    if trainer.is_world_process_zero():
        outputs.save_plan(training_args.output_dir, recipe.plan)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    trainer.accelerator.print(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    processes, accumulation = trainer.accelerator.num_processes, training_args.gradient_accumulation_steps
    if processes > 1:  # recipes are tuned for one GPU: say what the step became
        keep = config.one_gpu_batch_flags(training_args, processes)
        trainer.accelerator.print(
            f"Each optimizer step: {processes} processes x {accumulation} accumulation steps x "
            f"{training_args.per_device_train_batch_size} rows{f'; {keep} keeps the one-GPU batch' if keep else ''}"
        )

    ################
    # Train (resuming from the last checkpoint when a previous run was interrupted)
    ################
    if resume_from:
        trainer.accelerator.print(f"Resuming from {resume_from}")
    result = resume.train(trainer, resume_from)  # to exactly the last step, never past it
    guard.raise_if_tripped(training_args.output_dir)

    ################
    # Save: adapter (atomically), tokenizer with our chat template, resolved recipe, metrics
    ################
    metrics = {**result.metrics, "trainable_parameters": trainable, **stats_for_metrics(stats)}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    # The report below scores the held-out rows for base and adapter; a final evaluation by the Trainer would only
    # repeat the adapter's half of it (minutes on a CPU), so it runs only where no report follows: several processes
    # with eval_report, or eval_report false with an eval_strategy (false alone means no evaluation at all).
    reporting = prepared.eval and run_args.eval_report and trainer.accelerator.num_processes == 1
    if prepared.eval and not reporting and (run_args.eval_report or training_args.eval_strategy != "no"):
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    outputs.save_adapter(trainer, training_args.output_dir, recipe.resolved, resumed_with)
    trainer.accelerator.print(f"Adapter saved to {training_args.output_dir}")

    ################
    # Report: base vs adapter on the held-out rows (one process; sharded runs use evaluate.py afterwards)
    ################
    if reporting:
        from gemma_sft import inference

        report = inference.compare(
            trainer.model, tokenizer, prepared.eval_messages, training_args.output_dir, run_args.report_prompts,
            run_args.report_max_new_tokens, categories=prepared.eval_categories,
        )  # fmt: skip
        base, tuned = report["base"], report["adapter"]
        eval_metrics = {"eval_loss": tuned["loss"], "eval_base_loss": base["loss"], "eval_rows": tuned["rows"]}
        trainer.save_metrics("eval", eval_metrics)
        print(report["summary"])
    elif prepared.eval and run_args.eval_report and trainer.is_world_process_zero():
        print(f"Next: python evaluate.py --adapter {training_args.output_dir}")
    return 0


def stats_for_metrics(stats: dict) -> dict:
    return {"train_rows": stats["train_rows"], "eval_rows": stats["eval_rows"], "train_tokens": stats["train_tokens"]}


# How the entry script reports an interruption or running out of memory (gemma_sft.errors.run)
RUN_OPTIONS = dict(
    on_interrupt="interrupted: re-run the same command to resume from the last checkpoint",
    on_out_of_memory="on a card under 11 GiB use recipes/gemma3_belle_low_memory.yaml (the same job); below "
    "that, divide --max_length (and --pad_to_multiple_of) and multiply --gradient_accumulation_steps by the same "
    "factor; re-running resumes from the last checkpoint",
)
