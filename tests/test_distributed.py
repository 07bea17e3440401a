"""A 2-process data-parallel run (gloo, CPU) through `accelerate launch`: both ranks end with the same adapter,
and the adapter is saved once. On CPU, `--use_cpu true` is what makes accelerate pick its multi-CPU (gloo) mode.
Also: the accelerate configs load, and the FSDP one wraps every layer of the real Gemma 3 architecture."""

from types import SimpleNamespace

import pytest
import torch
from conftest import (
    REPO_ROOT,
    TINY_RECIPE_FLAGS,
    belle_rows,
    gemma3_4b_on_meta,
    mission_lora,
    run_script,
    tiny_text_config,
    write_jsonl,
)
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.train  # every test here trains a model or uses a trained one


# Runs sft.main in each process and, at save time, also writes this rank's LoRA weights for the test to compare, with
# the class that wraps the model in the file's metadata (not on stdout, which both ranks share: a rank's line can be
# split by the other rank's writes).
WRAPPER = """
import sys
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
from gemma_sft import outputs
import sft

original = outputs.save_adapter

def save_and_dump(trainer, output_dir, *args, **kwargs):
    lora = {{n: p.detach().cpu().contiguous() for n, p in trainer.model.named_parameters() if "lora_" in n}}
    wrapped = {{"wrapped": type(trainer.model_wrapped).__name__}}
    save_file(lora, f"{{output_dir}}/../rank{{trainer.accelerator.process_index}}.safetensors", metadata=wrapped)
    original(trainer, output_dir, *args, **kwargs)

outputs.save_adapter = save_and_dump
sys.exit(sft.main(sys.argv[1:]))
"""


def test_two_process_ddp_trains_one_adapter(tmp_path, tiny_model_dir):
    wrapper = tmp_path / "ddp_sft.py"
    wrapper.write_text(WRAPPER.format(root=str(REPO_ROOT)), encoding="utf-8")
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(40))
    out = tmp_path / "run" / "adapter"
    result = run_script(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        wrapper, "recipes/gemma3_270m_belle_demo.yaml", "--model_path", tiny_model_dir, "--data_path", rows,
        "--output_dir", out, *TINY_RECIPE_FLAGS, "--num_train_epochs", "2", "--ddp_backend", "gloo",
        "--use_cpu", "true", "--gradient_accumulation_steps", "2",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    hint = "Each optimizer step: 2 processes x 2 accumulation steps x 1 rows; --gradient_accumulation_steps 1 keeps"
    assert result.stdout.count(hint) == 1  # printed once, by rank 0
    assert "Next: python evaluate.py" in result.stdout  # the in-process report is left to evaluate.py
    ranks = [tmp_path / "run" / f"rank{i}.safetensors" for i in (0, 1)]
    for rank in ranks:
        with safe_open(str(rank), "pt") as f:
            assert f.metadata()["wrapped"] == "DistributedDataParallel"
    rank0, rank1 = (load_file(rank) for rank in ranks)
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], atol=0, rtol=0)
    assert any(t.abs().sum() > 0 for n, t in rank0.items() if "lora_B" in n)
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(rank0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter", "rank0.safetensors", "rank1.safetensors"]


def test_processes_without_data_parallelism_are_refused(tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "rows.jsonl", belle_rows(12))
    result = run_script(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "sft.py", "recipes/gemma3_270m_belle_demo.yaml", "--model_path", tiny_model_dir, "--data_path", rows,
        "--output_dir", tmp_path / "out", *TINY_RECIPE_FLAGS, "--ddp_backend", "gloo",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode != 0
    assert "each would train its own adapter: on CPU pass --use_cpu true" in result.stderr
    assert not (tmp_path / "out" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    ("name", "kind"),
    [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("fsdp_qlora", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")],
)
def test_accelerate_configs_load_and_say_how_to_launch_them(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO_ROOT / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == kind and config.mixed_precision == "bf16"
    header = path.read_text(encoding="utf-8").split("\n\n")[0]
    assert f"accelerate launch --config_file accelerate_configs/{name}.yaml" in header
    if name in ("fsdp_qlora", "deepspeed_zero3"):  # 4-bit weights must be stored in a float dtype to be sharded
        assert "--bnb_4bit_quant_storage bfloat16" in header
    if name == "fsdp_qlora":
        assert "--optim adamw_torch" in header  # FSDP cannot checkpoint bitsandbytes' optimizer state
        assert config.fsdp_config["fsdp_use_orig_params"] is False
    if name == "deepspeed_zero3":  # weights partitioned while loading; the adapter gathered into one file
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_init_flag"] is True


@pytest.mark.parametrize("architecture", ["gemma-3-4b-it", "text-only"])
def test_fsdp_config_wraps_every_decoder_layer(monkeypatch, architecture):
    """PEFT's FSDP wrap policy with the classes our config names, on the real gemma-3-4b-it architecture (meta tensors)
    and on a text-only Gemma 3 (as 270M and 1B are): each decoder layer is its own FSDP unit. Without the names, PEFT
    gives up on the multimodal Gemma 3."""
    from accelerate.commands.config.config_args import load_config_from_file
    from peft.utils.other import fsdp_auto_wrap_policy
    from transformers import Gemma3ForCausalLM

    if architecture == "text-only":
        text_config = tiny_text_config(num_hidden_layers=3, layer_types=["sliding_attention"] * 2 + ["full_attention"])
        with torch.device("meta"):
            base = Gemma3ForCausalLM(text_config)
    else:
        base = gemma3_4b_on_meta()
    layers = base.config.get_text_config().num_hidden_layers
    model = mission_lora(base)

    if architecture == "gemma-3-4b-it":
        monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
        with pytest.raises(TypeError, match="Could not find the transformer layer class"):
            fsdp_auto_wrap_policy(model)

    config = load_config_from_file(str(REPO_ROOT / "accelerate_configs" / "fsdp_qlora.yaml"))
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    policy = fsdp_auto_wrap_policy(model)
    units = [type(m).__name__ for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert units.count("Gemma3DecoderLayer") == layers
    # LoRA weights are trainable leaves: PEFT wraps them apart from the frozen 4-bit weights (use_orig_params=False)
    assert units.count("Linear") == 2 * 7 * layers


def test_launches_that_cannot_work_are_refused_with_the_fix(monkeypatch):
    import torch
    from trl import ModelConfig

    from gemma_sft import UserError, hardware

    four_bit = ModelConfig(load_in_4bit=True)
    mission = SimpleNamespace(optim="paged_adamw_32bit", save_strategy="steps")  # the fields check_launch reads
    fsdp_ready = SimpleNamespace(optim="adamw_torch", save_strategy="steps")
    hardware.check_launch(four_bit, mission)  # one process, at most one GPU, no FSDP: nothing to refuse
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match=r"2 GPUs are visible to one process.*--num_processes 2.*CUDA_VISIBLE_DEVICES"):
        hardware.check_launch(four_bit, mission)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under accelerate launch / torchrun each process takes one GPU
    hardware.check_launch(four_bit, mission)

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"FSDP needs CUDA GPUs; on CPU.*--use_cpu true"):
        hardware.check_launch(four_bit, mission)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="--bnb_4bit_quant_storage bfloat16"):
        hardware.check_launch(four_bit, mission)
    bf16_storage = ModelConfig(load_in_4bit=True, bnb_4bit_quant_storage="bfloat16")
    with pytest.raises(UserError, match=r"FSDP checkpoints cannot hold .*paged_adamw_32bit.*--optim adamw_torch"):
        hardware.check_launch(bf16_storage, mission)
    hardware.check_launch(bf16_storage, fsdp_ready)
    no_checkpoints = SimpleNamespace(optim="paged_adamw_32bit", save_strategy="no")
    hardware.check_launch(bf16_storage, no_checkpoints)
    hardware.check_launch(ModelConfig(load_in_4bit=False), fsdp_ready)

    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(
        UserError, match=r"DeepSpeed ZeRO-3 shards .*--bnb_4bit_quant_storage bfloat16.*deepspeed_zero3"
    ):
        hardware.check_launch(four_bit, mission)
    hardware.check_launch(bf16_storage, mission)  # DeepSpeed saves and restores bitsandbytes' state (measured)


# Two gloo processes shard a tiny Gemma 3 + LoRA with FSDP-1 as our config does (each decoder layer and LoRA leaf its
# own unit) and take one optimizer step. Then the adapter goes out and back the way the Trainer moves it under FSDP:
# the final save (a full state dict through PEFT's save_pretrained), and a checkpoint plus resume (accelerate's
# adapter-only save_fsdp_model / load_fsdp_model, our config's state-dict type) into a differently initialised copy.
FSDP_WORKER = """
import os, sys
from types import SimpleNamespace
root, tiny, out, state_dict_type = sys.argv[1:5]
sys.path.insert(0, root)
os.environ["ACCELERATE_USE_FSDP"] = "true"  # as `accelerate launch` sets it for an FSDP config
os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = "Gemma3DecoderLayer"
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullStateDictConfig, ShardedOptimStateDictConfig, ShardedStateDictConfig
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType
from accelerate import PartialState
from accelerate.utils import load_fsdp_model, save_fsdp_model, save_fsdp_optimizer
import transformers.trainer  # resume loads the optimizer through the Trainer's import of accelerate's loader
from peft import LoraConfig, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from transformers import Gemma3ForCausalLM
from gemma_sft import patches

patches.enable("fsdp_checkpoint_fixes")
dist.init_process_group("gloo")
rank = dist.get_rank()
PartialState(cpu=True)  # accelerate's helpers log through it

def sharded_lora(seed):
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(Gemma3ForCausalLM.from_pretrained(tiny), LoraConfig(r=4, target_modules=targets))
    return model, FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"))

def full_state(wrapped):
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        return wrapped.state_dict()

model, wrapped = sharded_lora(seed=0)
adamw = lambda fsdp_model: torch.optim.AdamW([p for p in fsdp_model.parameters() if p.requires_grad], lr=0.05)
optimizer = adamw(wrapped)
ids = torch.tensor([[2, 10, 20, 30, 40, 50]])

def train_step(fsdp_model, optim):
    fsdp_model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    optim.zero_grad()

train_step(wrapped, optimizer)
full = full_state(wrapped)
if rank == 0:
    model.save_pretrained(os.path.join(out, "adapter"), state_dict=full)

assert state_dict_type == "SHARDED_STATE_DICT", state_dict_type  # the stand-in below is for the sharded type
plugin = SimpleNamespace(fsdp_version=1, state_dict_type=StateDictType.SHARDED_STATE_DICT,
                         state_dict_config=ShardedStateDictConfig(),
                         optim_state_dict_config=ShardedOptimStateDictConfig())
accelerator = SimpleNamespace(process_index=rank, num_processes=2, is_main_process=rank == 0, is_fsdp2=False,
                              wait_for_everyone=dist.barrier)
save_fsdp_model(plugin, accelerator, wrapped, os.path.join(out, "checkpoint"), adapter_only=True)
save_fsdp_optimizer(plugin, accelerator, optimizer, wrapped, os.path.join(out, "checkpoint"))
_, resumed = sharded_lora(seed=1)  # other initial LoRA weights: only a real restore brings the trained ones back
load_fsdp_model(plugin, accelerator, resumed, os.path.join(out, "checkpoint"), adapter_only=True)
restored = full_state(resumed)
resumed_optimizer = adamw(resumed)  # fresh, as the Trainer creates it before loading a checkpoint
checkpoint = os.path.join(out, "checkpoint")
transformers.trainer.load_fsdp_optimizer(plugin, accelerator, resumed_optimizer, resumed, checkpoint)
train_step(wrapped, optimizer)  # the uninterrupted run and the resumed one take the same next step
train_step(resumed, resumed_optimizer)
continued, resumed_continued = full_state(wrapped), full_state(resumed)
if rank == 0:
    lora = lambda state: {k: v for k, v in state.items() if "lora_" in k}
    torch.save({"trained": lora(full), "restored": lora(restored), "continued": lora(continued),
                "resumed_continued": lora(resumed_continued)}, os.path.join(out, "lora.pt"))
dist.destroy_process_group()
"""


def test_fsdp_saves_and_resumes_the_whole_adapter(tmp_path, tiny_model_dir):
    """PEFT 0.21 alone finds no adapter tensor inside FSDP-1's nested units: an empty adapter file, empty checkpoints,
    and a resume that restores nothing; accelerate 1.15 restores no optimizer state into a fresh optimizer. With
    the fsdp_checkpoint_fixes entry of patches/registry.py every LoRA tensor is saved, reloads without FSDP, and
    comes back from a checkpoint exactly, with the Adam moments: the resumed run continues as if never stopped."""
    from accelerate.commands.config.config_args import load_config_from_file
    from peft import PeftModel
    from transformers import Gemma3ForCausalLM

    from gemma_sft import outputs

    config = load_config_from_file(str(REPO_ROOT / "accelerate_configs" / "fsdp_qlora.yaml"))
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER, encoding="utf-8")
    result = run_script(
        "-m", "torch.distributed.run", "--nproc_per_node", "2", worker, REPO_ROOT, tiny_model_dir, tmp_path,
        config.fsdp_config["fsdp_state_dict_type"], env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lora = torch.load(tmp_path / "lora.pt")
    trained, restored = lora["trained"], lora["restored"]
    assert len(trained) == 2 * 7 * 2  # A and B of 7 projections in each of the 2 layers
    assert any(t.abs().sum() > 0 for n, t in trained.items() if "lora_B" in n)  # the step moved the adapter
    assert restored.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(restored[name], trained[name], atol=0, rtol=0)
    # Adam's moments came back too: the resumed run's next step is the uninterrupted run's next step
    assert any(not torch.equal(lora["continued"][n], trained[n]) for n in trained)
    for name in trained:
        torch.testing.assert_close(lora["resumed_continued"][name], lora["continued"][name], atol=0, rtol=0)
    assert outputs.has_model_weights(tmp_path / "checkpoint")  # what resume looks for

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(trained)
    reloaded = PeftModel.from_pretrained(Gemma3ForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    weights = dict(reloaded.named_parameters())
    for name, tensor in trained.items():
        torch.testing.assert_close(weights[name], tensor, atol=0, rtol=0)
