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

# glibc's malloc hands out every block over 32 MB (a chunk of logits over the 262k-word vocabulary is several hundred)
# as fresh pages from the kernel and unmaps it on free, so each training step had the kernel zero the same memory
# again. Served from the heap and never trimmed, freed blocks are reused instead. Set before the xdist workers start,
# it reaches them and every script the tests run; other C libraries ignore it.
_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
if _MALLOC_TUNABLES not in os.environ.get("GLIBC_TUNABLES", ""):
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), _MALLOC_TUNABLES]))

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
    """export.py's f16 GGUF folder of the adapter (checked in llama.cpp where it is installed), made in this process:
    the adapter's tokenizer, read here, serves the tests on the file too (export.py itself runs in test_export)."""
    import contextlib
    import io

    from test_export import HAVE_LLAMA_CPP

    from gemma_sft.commands import export as export_script

    out = adapter_270m.parent / "gemma3-270m-test"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        flags = ["--type", "f16"] if HAVE_LLAMA_CPP else ["--type", "f16", "--no-verify"]
        assert export_script.main(["--adapter", str(adapter_270m), "--output", str(out), *flags]) == 0
    assert not HAVE_LLAMA_CPP or "checked in llama.cpp" in printed.getvalue()  # it read itself back before publishing
    return out


SHARED_270M = {"adapter_270m", "merged_270m", "f16_270m"}

# The longest tests outside the groups, longest first (a few minutes of the suite's CPU time between them). They
# start before the short ones, which then fill in whichever worker is ahead: a long test handed out last would leave
# the other worker idle until it ends.
LONGEST_FIRST = (
    "test_demo_recipe_trains_an_adapter_that_beats_the_base_on_held_out_rows",
    "test_cpu_mode_trains_each_set_up_and_writes_curves_table_and_plot",
    "test_a_killed_run_resumes_to_the_same_adapter_as_an_uninterrupted_one",
    "test_two_process_ddp_trains_one_adapter",
    "test_multimodal_base_exports_the_language_model_only",
    "test_training_changes_the_adapter_and_the_saved_adapter_reloads_identically",
    "test_fsdp_saves_and_resumes_the_whole_adapter",
    "test_a_second_run_on_the_same_output_folder_is_refused_naming_the_first",
    "test_kernels_under_triton_interpreter",
    "test_multimodal_gemma_3_trains_its_language_model_only_and_reloads",
    "test_user_mistakes_exit_2_with_one_line_and_no_output_dir",
    "test_packing_keeps_each_sample_to_itself",
)


def _shared_fixtures(item) -> set[str]:
    """The shared fixtures a test uses: those it names, and those it asks for by name while it runs."""
    names = set(getattr(item, "fixturenames", ()))
    code = getattr(getattr(item, "function", None), "__code__", None)
    constants = {value for value in code.co_consts if isinstance(value, str)} if code else set()
    return (names | constants) & (SHARED_270M | {"tiny_adapter"})


def pytest_collection_modifyitems(config, items):
    """Tests on the trained tiny adapter share one xdist worker: the adapter is trained once, not once per worker; and
    they train, so `make test-fast` leaves them out. Likewise the tests on the 270M's shared fixtures. The longest
    other tests come first."""
    for item in items:
        fixtures = _shared_fixtures(item)
        group = "tiny_adapter" if "tiny_adapter" in fixtures else "embedded_270m" if fixtures else None
        if group == "tiny_adapter":
            item.add_marker(pytest.mark.train)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
            if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
                _name_group_in_node_id(item, group)
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(getattr(item, "originalname", item.name), len(rank)))


def _name_group_in_node_id(item, group: str) -> None:
    """What `--dist loadgroup` schedules by: the group after an "@" at the end of a test's id. pytest-xdist 3.8 writes
    it to `item._nodeid`, which pytest 9.2 no longer reads (the id lives in `item._id`): without this, each worker
    built the shared fixtures for itself."""
    suffixed = f"{item.nodeid}@{group}"
    if item.nodeid.endswith(f"@{group}"):
        return
    if hasattr(item, "_id"):
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(suffixed)
    else:
        item._nodeid = suffixed


@pytest.fixture(autouse=True)
def _training_is_marked(request, monkeypatch):
    """A test that trains in this process must say so (@pytest.mark.train), so that the fast tier stays fast."""
    if request.node.get_closest_marker("train") or request.node.get_closest_marker("slow"):
        return
    from transformers import Trainer

    def refuse(self, *args, **kwargs):
        pytest.fail("this test trains a model: mark it @pytest.mark.train (make test-fast leaves those out)")

    monkeypatch.setattr(Trainer, "train", refuse)
