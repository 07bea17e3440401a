"""Loading the tokenizer (with our chat template) and the base model, quantized or not, minding Gemma 3's pitfalls."""

import os
from pathlib import Path

import torch

from gemma_sft import hardware
from gemma_sft.errors import UserError, hub_error
from gemma_sft.models import embedded
from gemma_sft.models.template import END_OF_TURN, read_chat_template, stop_token_ids


def resolve_model(name_or_path: str | None) -> str:
    """A local folder or Hub id; the embedded package name resolves to its converted, cached folder."""
    if not name_or_path:
        raise UserError("no model: set model_name_or_path in the recipe or pass --model_path")
    if name_or_path == embedded.EMBEDDED_MODEL:
        return str(embedded.model_dir())
    return name_or_path


def fetch_error(what: str, name: str, exc: Exception) -> UserError:
    local = "model_name_or_path (or --model_path) to the local folder"
    return hub_error(what, name, exc, local, f"hf download {name}")


_TOKENIZERS: dict = {}  # (folder's identity, chat template) -> tokenizer, for this process


def _folder_identity(name_or_path: str) -> tuple:
    """A local folder: its path and its files' sizes and times (an edited folder is read again); a Hub id: itself."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return (name_or_path,)
    stats = ((f.name, f.stat()) for f in folder.iterdir() if f.is_file())
    files = sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)
    return (str(folder.resolve()), tuple(files))


def read_tokenizer(name_or_path: str, chat_template: str | None = None):
    """AutoTokenizer.from_pretrained, read once per process while the folder is unchanged (transformers takes seconds
    to build Gemma 3's 262,144 entries): callers share the object, so they pass settings such as padding_side per
    call instead of setting them on it. `chat_template`, if given, replaces the saved one."""
    from transformers import AutoTokenizer

    key = (_folder_identity(name_or_path), chat_template)
    if key not in _TOKENIZERS:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def load_tokenizer(model_path: str, chat_template_path: str | None = None):
    """The model's tokenizer with our chat template (a shared object: see read_tokenizer)."""
    try:
        tokenizer = read_tokenizer(model_path, read_chat_template(chat_template_path))
    except (OSError, ValueError) as exc:
        raise fetch_error("tokenizer of", model_path, exc) from None
    if END_OF_TURN not in tokenizer.get_vocab():
        raise UserError(f"{model_path}: tokenizer has no {END_OF_TURN} token; is this a Gemma 3 model?")
    return tokenizer


def load_model(model_path: str, model_args, tokenizer):
    """The base model, 4-bit when the recipe asks, with <end_of_turn> as a stop token for generation."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    quantization_config = get_quantization_config(model_args)
    device_map = None
    if quantization_config is not None and torch.cuda.is_available() and not hardware.zero3_launch():
        # bitsandbytes places weights at load time: each process (DDP rank) gets a whole copy on its own GPU. Under
        # ZeRO-3, DeepSpeed partitions the weights as they load instead, and refuses a device map.
        device_map = {"": PartialState().local_process_index}
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            revision=model_args.model_revision,
            dtype=dtype,
            attn_implementation=model_args.attn_implementation,
            quantization_config=quantization_config,
            device_map=device_map,
        )
    except OSError as exc:
        raise fetch_error("model", model_path, exc) from None
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def resolve_tokenizer(name_or_path: str | None) -> str:
    """Like `resolve_model`, but the embedded model's tokenizer is ready without converting its weights."""
    if name_or_path == embedded.EMBEDDED_MODEL:
        return str(embedded.tokenizer_dir())
    return resolve_model(name_or_path)


def read_adapter_recipe(adapter_dir: str | os.PathLike) -> dict:
    """The resolved recipe saved next to an adapter (empty for adapters trained elsewhere)."""
    import yaml

    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder}: no finished adapter here (adapter_config.json missing); train one with sft.py")
    recipe = folder / "recipe.yaml"
    return (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}) if recipe.is_file() else {}


def adapter_base(adapter_dir: str | os.PathLike, base: str | None = None) -> tuple[str, dict]:
    """The base model an adapter goes on (an explicit one, else its recipe's, else PEFT's record) and its recipe."""
    import json

    recipe = read_adapter_recipe(adapter_dir)
    adapter_config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    base = base or recipe.get("model_name_or_path") or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}: the adapter does not name its base model; pass --base")
    return base, recipe


def load_for_inference(adapter_dir: str | os.PathLike, base: str | None = None):
    """Base model + adapter for evaluation, chat and merging: 4-bit bf16 on a GPU as in training, fp32 on CPU."""
    from peft import PeftModel
    from trl import ModelConfig

    base, recipe = adapter_base(adapter_dir, base)
    cuda = torch.cuda.is_available()
    attention = recipe.get("attn_implementation") or "sdpa"
    if attention == "flex_attention":  # for packed training rows; one row at a time is exact with sdpa, uncompiled
        attention = "sdpa"
    model_args = ModelConfig(
        model_name_or_path=base,
        dtype="bfloat16" if cuda else "float32",
        attn_implementation=attention,
        load_in_4bit=bool(recipe.get("load_in_4bit")) and cuda,
        bnb_4bit_quant_type=recipe.get("bnb_4bit_quant_type", "nf4"),
        use_bnb_nested_quant=bool(recipe.get("use_bnb_nested_quant")),
    )
    tokenizer = read_tokenizer(str(adapter_dir))  # saved with our chat template
    model = load_model(resolve_model(base), model_args, tokenizer)
    if cuda and not model_args.load_in_4bit:
        model.to("cuda")
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer, recipe
