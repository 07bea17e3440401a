"""Does a merged folder (merge.py) load in vLLM and in transformers? Its config and weight names, checked against
what each loader's Gemma 3 classes expect, from the safetensors headers alone (no weights are read).

vLLM picks its model class from config.json's `architectures`: Gemma3ForCausalLM (the 270M and 1B, text only,
model_type gemma3_text) or Gemma3ForConditionalGeneration (4B and up: language model, SigLIP vision tower and
projector, model_type gemma3 with text_config and vision_config). The multimodal class renames checkpoint prefixes
as transformers (>= 4.52) writes them (`model.language_model.` -> `language_model.model.`, ...) and then refuses any
name it has no parameter for; the text class loads `model.*` names and skips a tied `lm_head`. The usual failures
after fine-tuning: a 4B saved as Gemma3ForCausalLM with its language_model names, or LoRA leftovers (`base_layer`,
`lora_A`) in an unmerged save.
"""

import json
import struct
from pathlib import Path

TEXT_CLASS, MULTIMODAL_CLASS = "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"
# vLLM's Gemma3ForConditionalGeneration.hf_to_vllm_mapper (prefixes of a checkpoint written by transformers >= 4.52)
VLLM_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}
# The text config fields vLLM's and transformers' Gemma 3 text models are built from.
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "sliding_window",
               "layer_types", "query_pre_attn_scalar", "hidden_activation")  # fmt: skip
DTYPES = ("BF16", "F16", "F32")


def read_config(folder: Path) -> dict:
    """config.json as both loaders see it: through transformers, with every default filled in (save_pretrained
    writes only the values that differ from them), and `architectures` as written."""
    from transformers import AutoConfig

    written = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return AutoConfig.from_pretrained(folder).to_dict() | {"architectures": written.get("architectures")}


def read_tensors(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor in the folder's safetensors files, from their JSON headers."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        with open(folder / name, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        tensors.update({key: (value["dtype"], value["shape"]) for key, value in header.items()})
    return tensors


def _text_model(config: dict, prefix: str) -> dict[str, list[int]]:
    """vLLM's Gemma3Model parameters under `prefix`, with their shapes, in checkpoint names (q/k/v and gate/up
    apart: vLLM stacks them while loading)."""
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, inner = config["head_dim"], config["intermediate_size"]
    layer = {
        "input_layernorm": [hidden], "post_attention_layernorm": [hidden], "pre_feedforward_layernorm": [hidden],
        "post_feedforward_layernorm": [hidden], "self_attn.q_proj": [heads * head_dim, hidden],
        "self_attn.k_proj": [kv * head_dim, hidden], "self_attn.v_proj": [kv * head_dim, hidden],
        "self_attn.o_proj": [hidden, heads * head_dim], "self_attn.q_norm": [head_dim],
        "self_attn.k_norm": [head_dim], "mlp.gate_proj": [inner, hidden], "mlp.up_proj": [inner, hidden],
        "mlp.down_proj": [hidden, inner],
    }  # fmt: skip
    names = {f"{prefix}embed_tokens.weight": [config["vocab_size"], hidden], f"{prefix}norm.weight": [hidden]}
    for index in range(config["num_hidden_layers"]):
        names.update({f"{prefix}layers.{index}.{module}.weight": shape for module, shape in layer.items()})
    return names


def _vision_tower(config: dict, text_hidden: int) -> dict[str, list[int]]:
    """vLLM's SiglipVisionModel (no pooling head, as in Gemma 3) and Gemma3MultiModalProjector parameters."""
    hidden, inner, patch = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    model = "vision_tower.vision_model."
    names = {
        f"{model}embeddings.patch_embedding.weight": [hidden, config.get("num_channels", 3), patch, patch],
        f"{model}embeddings.patch_embedding.bias": [hidden],
        f"{model}embeddings.position_embedding.weight": [(config["image_size"] // patch) ** 2, hidden],
        f"{model}post_layernorm.weight": [hidden], f"{model}post_layernorm.bias": [hidden],
        "multi_modal_projector.mm_input_projection_weight": [hidden, text_hidden],
        "multi_modal_projector.mm_soft_emb_norm.weight": [hidden],
    }  # fmt: skip
    layer = {"self_attn.q_proj": [hidden, hidden], "self_attn.k_proj": [hidden, hidden],
             "self_attn.v_proj": [hidden, hidden], "self_attn.out_proj": [hidden, hidden], "layer_norm1": None,
             "layer_norm2": None, "mlp.fc1": [inner, hidden], "mlp.fc2": [hidden, inner]}  # fmt: skip
    for index in range(config["num_hidden_layers"]):
        for module, shape in layer.items():
            base = f"{model}encoder.layers.{index}.{module}"
            names[f"{base}.weight"] = shape or [hidden]
            names[f"{base}.bias"] = [shape[0] if shape else hidden]
    return names


def vllm_names(config: dict) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(the parameters vLLM loads, by their vLLM names, with shapes; the prefix renames it applies first)."""
    if config["architectures"] == [MULTIMODAL_CLASS]:
        text = config["text_config"]
        names = _text_model(text, "language_model.model.")
        names.update(_vision_tower(config["vision_config"], text["hidden_size"]))
        if not text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)):
            names["language_model.lm_head.weight"] = [text["vocab_size"], text["hidden_size"]]
        return names, VLLM_PREFIXES
    names = _text_model(config, "model.")
    if not config.get("tie_word_embeddings", True):
        names["lm_head.weight"] = [config["vocab_size"], config["hidden_size"]]
    return names, {}


def transformers_problems(folder: Path, architecture: str) -> list[str]:
    """What transformers' own loader reports for the folder (missing, unexpected or reshaped weights), loading onto
    the meta device: it renames checkpoint keys its own way (Hub layouts included), so it is asked, not imitated."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report goes to our list, not the terminal
    try:
        _, info = getattr(transformers, architecture).from_pretrained(folder, device_map="meta",
                                                                     output_loading_info=True)  # fmt: skip
    finally:
        transformers.logging.set_verbosity(verbosity)
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "reshaped")):
        if names := sorted(str(name) for name in info.get(key) or ()):
            problems.append(f"transformers: {len(names)} weights {what} (first {names[0]})")
    return problems


def _renamed(name: str, prefixes: dict[str, str]) -> str:
    old = next((prefix for prefix in prefixes if name.startswith(prefix)), None)
    return name if old is None else prefixes[old] + name[len(old) :]


def check_layout(config: dict, tensors: dict[str, tuple[str, list[int]]]) -> list[str]:
    """What would keep vLLM from loading a checkpoint with this config (read_config) and these tensors (name ->
    (dtype, shape)); empty when it loads it whole."""
    architectures = config.get("architectures")
    if architectures not in ([TEXT_CLASS], [MULTIMODAL_CLASS]):
        return [f"architectures is {architectures}, not [{TEXT_CLASS}] or [{MULTIMODAL_CLASS}]"]
    problems = []
    text = config.get("text_config") or {}
    if architectures == [TEXT_CLASS]:
        text = config
        if config.get("model_type") != "gemma3_text":
            problems.append(f"{TEXT_CLASS} needs model_type gemma3_text, not {config.get('model_type')}")
    elif (
        config.get("model_type") != "gemma3"
        or text.get("model_type") != "gemma3_text"
        or not config.get("vision_config")
    ):
        problems.append(
            f"{MULTIMODAL_CLASS} needs model_type gemma3 with a gemma3_text text_config and a vision_config"
        )
    if absent := [field for field in TEXT_FIELDS if text.get(field) is None]:
        problems.append(f"the text config lacks {', '.join(absent)}")
    if problems:
        return problems
    if len(text["layer_types"]) != text["num_hidden_layers"]:
        problems.append(f"layer_types has {len(text['layer_types'])} entries for {text['num_hidden_layers']} layers")
    if leftovers := sorted(name for name in tensors if "lora_" in name or "base_layer" in name):
        problems.append(f"the adapter is not merged ({leftovers[0]}, ...)")
    if odd := sorted(name for name, (dtype, _) in tensors.items() if dtype not in DTYPES):
        problems.append(f"{odd[0]} is stored as {tensors[odd[0]][0]}, not {'/'.join(DTYPES)}")

    expected, prefixes = vllm_names(config)
    have = {_renamed(name, prefixes): shape for name, (_, shape) in tensors.items()}
    missing = sorted(set(expected) - set(have))
    # a tied output head saved anyway is skipped by vLLM
    unexpected = sorted(name for name in set(have) - set(expected) if not name.endswith("lm_head.weight"))
    wrong = sorted(name for name in set(expected) & set(have) if list(expected[name]) != list(have[name]))
    for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)):
        if names:
            problems.append(f"vLLM: {len(names)} weights {what} (first {names[0]})")
    return problems


def check_merged(folder: str | Path) -> list[str]:
    """check_layout and transformers' own loader for a saved folder, plus what serving needs beside the weights: a
    tokenizer with a chat template and a generation config that stops at <end_of_turn>."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return [f"{folder} has no config.json"]
    try:
        config = read_config(folder)
    except (ValueError, KeyError) as error:
        return [f"config.json does not load in transformers ({error})"]
    problems = check_layout(config, read_tensors(folder))
    if not problems or not problems[0].startswith("architectures"):
        problems += transformers_problems(folder, config["architectures"][0])
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        problems.append("no tokenizer (tokenizer.json)")
    tokenizer_config = folder / "tokenizer_config.json"
    in_config = tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text("utf-8"))
    if not (folder / "chat_template.jinja").is_file() and not in_config:
        problems.append("no chat template (chat_template.jinja)")
    generation = folder / "generation_config.json"
    stops = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id") if generation.is_file() else None
    end_of_turn = 106  # Gemma 3's <end_of_turn> in every size
    if end_of_turn not in (stops if isinstance(stops, list) else [stops]):
        problems.append(f"generation_config.json's eos_token_id {stops} lacks <end_of_turn> ({end_of_turn})")
    return problems
