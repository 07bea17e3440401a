"""The first step's kernels compiled ahead in worker processes (gemma_sft/patches/precompile.py)."""

import json

import pytest
import torch
from conftest import REPO_ROOT, TINY_RECIPE_FLAGS, belle_rows, run_script, write_jsonl
from test_train import DEMO

from gemma_sft import config
from gemma_sft.patches import precompile


def four_b_text_config() -> dict:
    from transformers import Gemma3Config

    raw = json.loads((REPO_ROOT / "bench" / "gemma-3-4b-it.config.json").read_text())
    raw.pop("architectures")
    return Gemma3Config(**raw).get_text_config().to_dict()


def jobs(*flags, recipe="recipes/gemma3_belle.yaml") -> dict:
    parsed = config.parse([recipe, "--dry_run", *flags])
    return precompile.jobs_for(four_b_text_config(), parsed.training, parsed.model, parsed.speed)


def test_the_mission_recipe_gets_a_worker_for_each_kind_of_kernel_its_first_step_compiles():
    mission = jobs()
    assert set(mission) == {"layers", "attention", "dropout", "head"}
    assert mission["attention"]["tokens"] == 8192  # the row: its block masks' shape
    assert mission["dropout"]["tokens"] == mission["layers"]["tokens"] == 256  # divisible by 16 as 8,192 is
    assert mission["dropout"]["rank"] == 16 and mission["dropout"]["p"] == 0.1 and not mission["dropout"]["into"]
    assert mission["head"]["vocab"] == 262208 and mission["head"]["softcap"] is None
    for spec in mission.values():
        assert (spec["hidden_size"], spec["intermediate_size"], spec["head_dim"]) == (2560, 10240, 256)
    assert mission["layers"]["liger_kernel_config"] == {} == mission["attention"]["liger_kernel_config"]
    assert set(mission["layers"]["text_config"]["layer_types"]) == {"sliding_attention", "full_attention"}


def test_workers_are_left_out_where_their_kernels_are_not_used():
    assert "layers" not in jobs("--use_liger_kernel", "false")
    assert jobs("--use_liger_kernel", "false")["attention"]["liger_kernel_config"] is None
    assert "attention" not in jobs("--attn_implementation", "sdpa")
    assert "attention" not in jobs("--cuda_graphs", "false")  # the masks flex_attention gets are transformers' own
    assert "attention" not in jobs("--pad_to_multiple_of", "4096")  # rows of several shapes
    assert "dropout" not in jobs("--lora_dropout", "0")
    assert "dropout" not in jobs("--lora_dropout_in_kernels", "false")
    assert "head" not in jobs("--fused_output_head", "false")
    assert jobs("--fp8_base_matmuls", "true")["dropout"]["into"]
    low_memory = jobs(recipe="recipes/gemma3_belle_low_memory.yaml")
    assert low_memory["attention"]["tokens"] == 4096
    assert jobs("--max_length", "1000", "--pad_to_multiple_of", "1000")["dropout"]["tokens"] == 256 + 1000 % 16


def test_a_failed_worker_is_reported_with_its_last_line_and_the_run_goes_on():
    workers = precompile.start({"unknown": {"device": 0}})
    outcome = workers.wait(timeout=120)
    assert outcome["jobs"]["unknown"].startswith("failed (ValueError: unknown job 'unknown'")
    assert workers.wait()["jobs"] == {}  # joined once


@pytest.mark.skipif(torch.cuda.is_available(), reason="the switch's CPU behaviour")
def test_no_workers_start_off_a_gpu(tiny_model_dir):
    parsed = config.parse(["recipes/gemma3_belle.yaml", "--dry_run"])
    assert precompile.start_for(str(tiny_model_dir), parsed.training, parsed.model, parsed.speed) is None


def cubins(folder) -> set:
    return {path.name for path in folder.rglob("*.cubin")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles GPU kernels")
def test_after_the_workers_a_training_run_compiles_no_kernel_of_its_own(tmp_path, tiny_model_dir):
    """The workers, on empty kernel caches, then sft.py with the switch off: its first steps find every Triton and
    flex_attention kernel they launch in the caches (no new cubin)."""
    caches = {"TRITON_CACHE_DIR": tmp_path / "triton", "TORCHINDUCTOR_CACHE_DIR": tmp_path / "inductor"}
    data = write_jsonl(tmp_path / "rows.jsonl", belle_rows(24))
    flags = [*TINY_RECIPE_FLAGS, "--model_path", str(tiny_model_dir), "--data_path", str(data), "--eval_samples", "0",
             "--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--dtype", "bfloat16", "--bf16", "true",
             "--packing", "true", "--max_length", "512", "--pad_to_multiple_of", "512", "--attn_implementation",
             "flex_attention", "--use_liger_kernel", "true", "--lora_dropout", "0.1", "--gradient_checkpointing",
             "true", "--max_steps", "2", "--eval_report", "false"]  # fmt: skip
    parsed = config.parse([DEMO, *flags])
    text_config = precompile.text_config_of(str(tiny_model_dir))
    planned = precompile.jobs_for(text_config, parsed.training, parsed.model, parsed.speed)
    assert set(planned) == {"layers", "attention", "dropout", "head"}
    with pytest.MonkeyPatch.context() as env:
        for name, folder in caches.items():
            env.setenv(name, str(folder))
        outcome = precompile.start(planned).wait()
    assert all(what.startswith("done (") for what in outcome["jobs"].values()), outcome
    before = set().union(*(cubins(folder) for folder in caches.values()))
    assert before
    env = {name: str(folder) for name, folder in caches.items()}
    result = run_script("sft.py", DEMO, *flags, "--output_dir", tmp_path / "out", "--precompile_kernels", "false",
                        env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    after = set().union(*(cubins(folder) for folder in caches.values()))
    assert after - before == set()
