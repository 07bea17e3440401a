"""Shared fixtures: the real Gemma 3 tokenizer (from the embedded 270M package) and tiny random Gemma 3 models."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from gemma_sft import REPO_ROOT
from gemma_sft.models import embedded, load_tokenizer, read_tokenizer

SAMPLE = REPO_ROOT / "data" / "belle_sample_zh.jsonl"

# Prepared data is cached per test session (and per xdist worker), never in the user's cache; scripts run by the tests
# inherit it.
os.environ["GEMMA_SFT_DATA_CACHE"] = tempfile.mkdtemp(prefix="gemma-sft-test-data-")
atexit.register(shutil.rmtree, os.environ["GEMMA_SFT_DATA_CACHE"], ignore_errors=True)


def tiny_text_config(**overrides):
    from transformers import Gemma3TextConfig

    values = dict(
        vocab_size=262144,
        # bitsandbytes' CPU 4-bit inference path needs every input width to be a multiple of 64 (its block size)
        # and every output width a multiple of 32.
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=32,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    values.update(overrides)
    return Gemma3TextConfig(**values)


def gemma3_4b_on_meta():
    """The real gemma-3-4b-it architecture (bench/gemma-3-4b-it.config.json) on the meta device: no memory."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    raw = json.loads((REPO_ROOT / "bench" / "gemma-3-4b-it.config.json").read_text())
    raw.pop("architectures")
    with torch.device("meta"):
        return Gemma3ForConditionalGeneration(Gemma3Config(**raw))


def mission_lora(model):
    """The model with the mission recipe's LoRA config, built the way sft.py builds it."""
    from peft import get_peft_model
    from trl import get_peft_config

    from gemma_sft import config

    _, _, model_args, _, *_ = config.parse(["recipes/gemma3_belle.yaml", "--dry_run"])
    return get_peft_model(model, get_peft_config(model_args))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return embedded.tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer random Gemma3ForCausalLM with the real Gemma 3 tokenizer, saved like a Hub checkpoint."""
    import torch
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    Gemma3ForCausalLM(tiny_text_config()).save_pretrained(folder)
    read_tokenizer(str(tokenizer_dir)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_multimodal_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Gemma3ForConditionalGeneration (language model + SigLIP tower), the class of gemma-3-4b-it."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gemma3-multimodal")
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=14, vision_use_head=False)  # fmt: skip
    config = Gemma3Config(
        text_config=tiny_text_config(vocab_size=262208).to_dict(),  # 4b's vocabulary: room for the image token
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=255999,
        eoi_token_index=256000,
        image_token_index=262144,
    )
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    read_tokenizer(str(tokenizer_dir)).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def belle_rows(count: int, offset: int = 0) -> list[dict]:
    """Small made-up arithmetic rows: cheap to train on, each answer determined by its question."""
    rows = []
    for i in range(offset, offset + count):
        a, b = 3 + i % 17, 5 + (i * 7) % 23
        rows.append({"instruction": f"计算 {a} 加 {b} 等于多少？", "input": "", "output": f"{a} + {b} = {a + b}。"})
    return rows


def run_script(*args, cwd=REPO_ROOT, timeout=600, env=None, input_text=None) -> subprocess.CompletedProcess:
    """Run one of the entry scripts in a fresh Python process, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        input=input_text if input_text is not None else "",
    )


TINY_RECIPE_FLAGS = [
    "--dtype", "float32", "--bf16", "false", "--load_in_4bit", "false",
    "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
    "--max_length", "256", "--learning_rate", "5e-3", "--eval_samples", "2", "--max_samples", "0",
    "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished sft.py run on the tiny model (with its automatic base-vs-adapter report)."""
    from sft import main as sft_main

    folder = tmp_path_factory.mktemp("tiny-run")
    data = write_jsonl(folder / "rows.jsonl", belle_rows(40))
    out = folder / "adapter"
    flags = list(TINY_RECIPE_FLAGS)
    flags[flags.index("--eval_samples") + 1] = "6"
    flags[flags.index("--eval_strategy") + 1] = "epoch"  # TRL's own evaluation too, to check the report against
    args = ["recipes/gemma3_270m_belle_demo.yaml", "--model_path", str(tiny_model_dir), "--data_path", str(data),
            "--output_dir", str(out), "--num_train_epochs", "3", *flags]  # fmt: skip
    assert sft_main(args) == 0
    return out


# --- the embedded Gemma 3 270M with a random adapter: exported, merged and served by several test files (slow) ---
CONTEXT_270M = 512  # the adapter's recipe max_length: the server's context


@pytest.fixture(scope="session")
def adapter_270m(tmp_path_factory) -> Path:
    from test_export import random_adapter

    folder = random_adapter(embedded.model_dir(), tmp_path_factory.mktemp("serve") / "belle-270m",
                            embedded.EMBEDDED_MODEL)  # fmt: skip
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) | {"max_length": CONTEXT_270M}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


@pytest.fixture(scope="session")
def merged_270m(adapter_270m):
    """(model, tokenizer): the adapter merged into the 270M the way export.py merges it, in float32."""
    from test_export import merged

    return merged(adapter_270m)


@pytest.fixture(scope="session")
def f16_270m(adapter_270m) -> Path:
    """export.py's f16 GGUF folder of the adapter (checked in llama.cpp where it is installed)."""
    from test_export import HAVE_LLAMA_CPP, export

    out = adapter_270m.parent / "gemma3-270m-test"
    result = export(adapter_270m, out, "--type", "f16")
    assert result.returncode == 0, result.stderr
    assert not HAVE_LLAMA_CPP or "checked in llama.cpp" in result.stdout  # it read itself back before publishing
    return out


SHARED_270M = {"adapter_270m", "merged_270m", "f16_270m"}


def pytest_collection_modifyitems(config, items):
    """Tests on the trained tiny adapter share one xdist worker: the adapter is trained once, not once per worker; and
    they train, so `make test-fast` leaves them out. Likewise the tests on the 270M's shared fixtures."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "tiny_adapter" in fixtures:
            item.add_marker(pytest.mark.xdist_group("tiny_adapter"))
            item.add_marker(pytest.mark.train)
        elif fixtures & SHARED_270M:
            item.add_marker(pytest.mark.xdist_group("embedded_270m"))


@pytest.fixture(autouse=True)
def _training_is_marked(request, monkeypatch):
    """A test that trains in this process must say so (@pytest.mark.train), so that the fast tier stays fast."""
    if request.node.get_closest_marker("train") or request.node.get_closest_marker("slow"):
        return
    from transformers import Trainer

    def refuse(self, *args, **kwargs):
        pytest.fail("this test trains a model: mark it @pytest.mark.train (make test-fast leaves those out)")

    monkeypatch.setattr(Trainer, "train", refuse)
