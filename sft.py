"""QLoRA instruction fine-tuning of Gemma 3 from a YAML recipe.

    accelerate launch sft.py recipes/gemma3_belle.yaml                 # the mission: gemma-3-4b-it on 2,000 Belle rows
    python sft.py recipes/gemma3_270m_belle_demo.yaml                  # embedded Gemma 3 270M, CPU-friendly demo
    python sft.py recipes/gemma3_belle.yaml --data_path my.jsonl --dry_run   # check your data before paying for a GPU

Every recipe key is a TRL field name (ScriptArguments, SFTConfig, ModelConfig) or one of the data fields in
gemma_sft/config.py; flags override the recipe. The original tool's --model_path, --data_path, --epochs,
--batch_size and --output_path still work.
"""

import json
import os

from gemma_sft import UserError, run


def main(argv: list[str] | None = None) -> int:
    from gemma_sft import config, data, modeling, outputs

    ################
    # Recipe
    ################
    data_args, training_args, model_args, resolved = config.parse(argv)
    modeling.check_precision(training_args, model_args)
    if not data_args.dry_run:
        resume_from = outputs.check_output_dir(training_args.output_dir, data_args.overwrite_output_dir)
        modeling.check_launch(model_args, training_args)

    ################
    # Data: rows -> Gemma chat messages -> token ids with the answer mask
    ################
    tokenizer_path = modeling.resolve_tokenizer(model_args.model_name_or_path)
    tokenizer = modeling.load_tokenizer(tokenizer_path, training_args.chat_template_path)
    prepared = data.prepare_from_settings(resolved, tokenizer)
    summary, stats = data.summarize(prepared, tokenizer)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process under accelerate launch
        print(summary, flush=True)
    if data_args.dry_run:
        print(json.dumps(stats, ensure_ascii=False))
        return 0

    ################
    # Model and trainer: TRL packs, collates and trains; PEFT adds LoRA on the language model only
    ################
    outputs.create_output_dir(training_args.output_dir, data_args.overwrite_output_dir)
    guard = outputs.StopOnNonFiniteLoss()
    trainer = build_trainer(
        training_args, model_args, prepared, tokenizer, [guard], data_args.fused_qlora, data_args.keep_mlp_outputs
    )
    if trainer.accelerator.num_processes > 1 and trainer.accelerator.distributed_type == "NO":
        raise UserError(
            "several processes were launched but accelerate set up no data parallelism, so each would train its "
            "own adapter: on CPU pass --use_cpu true; on GPUs check CUDA_VISIBLE_DEVICES"
        )
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
    result = trainer.train(resume_from_checkpoint=resume_from)
    guard.raise_if_tripped(training_args.output_dir)

    ################
    # Save: adapter (atomically), tokenizer with our chat template, resolved recipe, metrics
    ################
    metrics = {**result.metrics, "trainable_parameters": trainable, **stats_for_metrics(stats)}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    # The report below scores the held-out rows for base and adapter; a final evaluation by the Trainer would only
    # repeat the adapter's half of it (minutes on a CPU), so it runs only where no report follows.
    reporting = prepared.eval and data_args.eval_report and trainer.accelerator.num_processes == 1
    if prepared.eval and not reporting:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    outputs.save_adapter(trainer, training_args.output_dir, resolved)
    trainer.accelerator.print(f"Adapter saved to {training_args.output_dir}")

    ################
    # Report: base vs adapter on the held-out rows (one process; sharded runs use evaluate.py afterwards)
    ################
    if reporting:
        from gemma_sft import evaluation

        report = evaluation.compare(
            trainer.model, tokenizer, prepared.eval_messages, training_args.output_dir,
            categories=prepared.eval_categories,
        )  # fmt: skip
        base, tuned = report["base"], report["adapter"]
        eval_metrics = {"eval_loss": tuned["loss"], "eval_base_loss": base["loss"], "eval_rows": tuned["rows"]}
        trainer.save_metrics("eval", eval_metrics)
        print(report["summary"])
    elif prepared.eval and data_args.eval_report and trainer.is_world_process_zero():
        print(f"Next: python evaluate.py --adapter {training_args.output_dir}")
    return 0


def build_trainer(
    training_args, model_args, prepared, tokenizer, callbacks=(), fused_qlora=True, keep_mlp_outputs=True
):
    """The base model (4-bit when the recipe asks) in TRL's SFTTrainer with the LoRA config; shared with bench/."""
    from datasets import Dataset
    from trl import SFTTrainer, get_peft_config

    from gemma_sft import attention, data, modeling, output_head
    from gemma_sft import fused_qlora as fused

    modeling.patch_fsdp_checkpoints()
    data.pack_in_large_batches()
    output_head.install()
    fused_layers = fused_qlora and model_args.load_in_4bit and not modeling.sharded_launch()
    fused.enable() if fused_layers else fused.disable()
    callbacks = [*callbacks, attention.NormHeadsInStoredLayout(), modeling.FreezeSetUpObjects()]
    if fused_layers and keep_mlp_outputs and training_args.gradient_checkpointing and not training_args.torch_compile:
        callbacks.append(fused.KeepMLPOutputs())  # (with torch_compile the compiled layers would trace it: untried)
    if model_args.attn_implementation == "flex_attention":
        attention.tune_flex_attention()
    model = modeling.load_model(modeling.resolve_model(model_args.model_name_or_path), model_args, tokenizer)
    if training_args.torch_compile:
        # Compile one decoder layer and reuse it for every layer (accelerate's regional compilation) rather than
        # tracing the whole model: seconds of compilation instead of minutes, and one graph per layer type.
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(prepared.train),
        eval_dataset=Dataset.from_list(prepared.eval) if prepared.eval else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=list(callbacks),
    )
    # The Trainer's FLOP count walks every parameter of the model on each micro-step (~60 ms for the 4-bit 4B model,
    # host time the GPU waits for); the count cannot change while training, so take it once.
    non_embedding = trainer.model.num_parameters(exclude_embeddings=True)
    trainer.floating_point_ops = lambda inputs: (
        6 * inputs["input_ids"].numel() * non_embedding if "input_ids" in inputs else 0
    )
    return trainer


def stats_for_metrics(stats: dict) -> dict:
    return {"train_rows": stats["train_rows"], "eval_rows": stats["eval_rows"], "train_tokens": stats["train_tokens"]}


if __name__ == "__main__":
    run(
        main,
        on_interrupt="interrupted: re-run the same command to resume from the last checkpoint",
        on_out_of_memory="on a card under 14 GiB use recipes/gemma3_belle_low_memory.yaml (the same job); below "
        "that, divide --max_length (and --pad_to_multiple_of) and multiply --gradient_accumulation_steps by the same "
        "factor; re-running resumes from the last checkpoint",
    )
