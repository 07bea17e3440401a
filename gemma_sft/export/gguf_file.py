"""A Hugging Face Gemma 3 text model (state dict, config, tokenizer) written as one GGUF file for llama.cpp.

Only the `gemma3` architecture's text model is mapped. For a Gemma3ForConditionalGeneration (gemma-3-4b-it and
larger) the language model is exported and the SigLIP vision tower and its projector are left out: llama.cpp keeps
those in a separate "mmproj" file, which this module does not write.

The conventions followed are those of llama.cpp's own converter (convert_hf_to_gguf.py, Gemma3Model) and its
loader (src/models/gemma3.cpp); each place they matter says so.
"""

import json
import os
import re
from pathlib import Path

import numpy as np

from gemma_sft import UserError

ARCH = "gemma3"
TYPES = ("f16", "q8_0")
END_OF_TURN = "<end_of_turn>"

# Per-layer HF module names -> llama.cpp's tensor names (gguf-py's MODEL_TENSOR names for gemma3).
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Parts of a multimodal checkpoint that are not the language model.
_NOT_TEXT = ("vision_tower.", "multi_modal_projector.")

# SentencePiece / llama.cpp token types (gguf.TokenType): the values llama.cpp's vocabulary loader reads.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


def text_config(config):
    """The text model's config of a Gemma3ForCausalLM or Gemma3ForConditionalGeneration."""
    text = getattr(config, "text_config", None) or config
    if getattr(text, "model_type", None) not in ("gemma3_text", "gemma3"):
        raise UserError(f"GGUF export supports Gemma 3 only; this model is {getattr(text, 'model_type', '?')}")
    return text


def _rope(config, layer_type: str) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(layer_type, params) if isinstance(params, dict) else {}
    return dict(params)


def _check_supported(config) -> None:
    """Settings llama.cpp's gemma3 graph cannot express: refuse them rather than write a file that runs wrong."""
    if getattr(config, "attn_logit_softcapping", None):
        raise UserError("attn_logit_softcapping is set: llama.cpp's gemma3 graph has no attention softcapping")
    if getattr(config, "use_bidirectional_attention", False):
        raise UserError("bidirectional attention (an embedding model) is not the gemma3 causal architecture")
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UserError(f"hidden_activation {config.hidden_activation}: llama.cpp's gemma3 uses tanh GELU")
    # llama.cpp scales queries by 1/sqrt(key_length), except for the 27B (62 layers): 1/sqrt(hidden/heads).
    # HF scales by query_pre_attn_scalar**-0.5; there is no GGUF key for another value.
    expected = config.head_dim if config.num_hidden_layers != 62 else config.hidden_size // config.num_attention_heads
    if config.query_pre_attn_scalar != expected:
        raise UserError(
            f"query_pre_attn_scalar {config.query_pre_attn_scalar} differs from {expected}, "
            "the attention scale llama.cpp assumes for this model size"
        )
    sliding = _rope(config, "sliding_attention")
    if sliding.get("rope_type", "default") != "default":
        raise UserError(f"rope scaling on sliding-window layers ({sliding['rope_type']}) is not expressible in GGUF")
    full = _rope(config, "full_attention")
    if full.get("rope_type", "default") not in ("default", "linear"):
        raise UserError(f"rope_type {full['rope_type']}: only default and linear rope scaling are exported")


def text_tensors(state_dict: dict, config) -> dict:
    """HF tensor name -> GGUF tensor name for the language model; anything else is an error, so that no weight is
    silently dropped (the vision tower and projector excepted, on purpose)."""
    names = {}
    for key in state_dict:
        if any(part in key for part in _NOT_TEXT):
            continue
        name = key
        for prefix in ("model.language_model.", "language_model.model.", "model.", "language_model."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name == "embed_tokens.weight":
            names[key] = "token_embd.weight"
        elif name == "norm.weight":
            names[key] = "output_norm.weight"
        elif key.endswith("lm_head.weight"):
            # Tied to the embedding in every Gemma 3: llama.cpp then reuses token_embd (no output.weight).
            if not getattr(config, "tie_word_embeddings", True):
                names[key] = "output.weight"
        elif match := re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name):
            layer, module = match.groups()
            if module not in _LAYER_TENSORS:
                raise UserError(f"unexpected tensor {key}: not part of the Gemma 3 text model")
            names[key] = f"blk.{layer}.{_LAYER_TENSORS[module]}.weight"
        else:
            raise UserError(f"unexpected tensor {key}: not part of the Gemma 3 text model")
    return names


def vocabulary(tokenizer, model_dirs=()) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types in id order.

    llama.cpp tokenizes Gemma with its SentencePiece-BPE tokenizer ("llama"): starting from characters it joins,
    again and again, the adjacent pair whose joined piece has the highest score. The scores therefore have to
    rank the pieces as the HF tokenizer's merges do. They come from a SentencePiece `tokenizer.model` when a model
    folder has one (what llama.cpp's converter reads); otherwise they are derived from the HF tokenizer.
    """
    count = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(count)))
    if any(token is None for token in tokens):
        raise UserError("the tokenizer's ids are not contiguous; cannot write its vocabulary")
    added = {index: entry for index, entry in tokenizer.added_tokens_decoder.items()}
    spm = next((Path(d) / "tokenizer.model" for d in model_dirs if (Path(d) / "tokenizer.model").is_file()), None)
    if spm is not None:
        scores, types = _sentencepiece_scores(spm, count)
    else:
        scores, types = _derived_scores(tokenizer, tokens)
    for index, entry in added.items():
        # As llama.cpp's converter does: tokens of the HF added-tokens table are control tokens when special (the
        # chat markers, <bos>, <unused*>) and user-defined otherwise (runs of newlines and spaces, matched whole),
        # with score -1000 (never chosen by a merge).
        if index < count:
            types[index] = CONTROL if entry.special else USER_DEFINED
            scores[index] = -1000.0
    return tokens, scores, types


def _sentencepiece_scores(path: Path, count: int) -> tuple[list[float], list[int]]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    scores = [float(piece.score) for piece in proto.pieces][:count]
    types = [int(piece.type) for piece in proto.pieces][:count]  # SentencePiece's enum is llama.cpp's
    scores += [-1000.0] * (count - len(scores))  # added after training (gemma-3-4b's <image_soft_token>)
    types += [USER_DEFINED] * (count - len(types))
    return scores, types


def _derived_scores(tokenizer, tokens: list[str]) -> tuple[list[float], list[int]]:
    """Scores from the HF tokenizer: for BPE, a piece scores minus the rank of the first merge that forms it, so
    that llama.cpp's highest-score-first joining applies the merges in the HF order. (SentencePiece BPE and HF's
    conversion of it are the same rule read both ways: `embedded.build_tokenizer` turns such scores back into this
    merge order.) Pieces no merge forms (characters, bytes) are never joined and score below all others."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model["type"] == "Unigram":
        scores = [float(score) for _, score in model["vocab"]]
        scores += [-1000.0] * (len(tokens) - len(scores))
    elif model["type"] == "BPE":
        vocab = model["vocab"]
        first_rank = {}
        for rank, merge in enumerate(model["merges"]):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            first_rank.setdefault(left + right, rank)
        floor = -float(len(model["merges"]) + 1)
        by_id = {index: piece for piece, index in vocab.items()}
        ranks = [first_rank.get(by_id.get(i)) for i in range(len(tokens))]
        scores = [floor if rank is None else -float(rank) for rank in ranks]
    else:
        raise UserError(f"tokenizer model {model['type']}: only SentencePiece-style BPE or Unigram can be exported")
    types = []
    for index, token in enumerate(tokens):
        if _BYTE_PIECE.match(token):
            types.append(BYTE)
            scores[index] = 0.0
        elif token == tokenizer.unk_token:
            types.append(UNKNOWN)
        else:
            types.append(NORMAL)
    return scores, types


def _as_array(tensor, gguf_name: str, kind: str):
    """(numpy data, raw GGML type or None) for one tensor, after llama.cpp's per-tensor transformations."""
    import torch
    from gguf import GGMLQuantizationType, quants

    data = tensor.detach().to(torch.float32)
    if gguf_name.endswith("norm.weight"):
        # HF's Gemma3RMSNorm stores w and computes x * (1 + w); llama.cpp's graph multiplies by the stored weight
        # as it is (x * w), so its converter stores 1 + w, as we do (in float32: exact for bf16 weights).
        data = data + 1.0
    array = data.numpy()
    if array.ndim == 1:
        # llama.cpp keeps 1-D tensors (the norms) in float32 whatever the file type.
        return array, None
    if kind == "q8_0" and array.shape[-1] % 32 == 0:
        # Q8_0 blocks run along rows of 32 values; llama.cpp quantizes every 2-D weight this way, the embedding too.
        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    half = array.astype(np.float16)
    if not np.isfinite(half).all():  # bf16's range is wider than f16's: keep such a tensor exact rather than inf
        return array, None
    return half, None


def write_gguf(path, state_dict: dict, config, tokenizer, *, kind: str = "f16", name: str = "model",
               model_dirs=()) -> None:  # fmt: skip
    """Write `state_dict` (a merged Gemma 3, HF names) with its config and tokenizer as one GGUF file at `path`."""
    from gguf import GGUFWriter, LlamaFileType, RopeScalingType

    if kind not in TYPES:
        raise UserError(f"--type {kind}: choose one of {', '.join(TYPES)}")
    config = text_config(config)
    _check_supported(config)
    names = text_tensors(state_dict, config)
    tokens, scores, types = vocabulary(tokenizer, model_dirs)

    writer = GGUFWriter(os.fspath(path), ARCH)
    writer.add_name(name)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if kind == "q8_0" else LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(2)

    # Hyperparameters under the keys llama.cpp's gemma3 loader reads.
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)  # also sets llama.cpp's attention scale, 1/sqrt(key_length)
    writer.add_value_length(config.head_dim)
    full, sliding = _rope(config, "full_attention"), _rope(config, "sliding_attention")
    writer.add_rope_freq_base(full.get("rope_theta", 1_000_000.0))  # the global (full-attention) layers
    writer.add_rope_freq_base_swa(sliding.get("rope_theta", 10_000.0))  # llama.cpp's default is 10000 too
    if full.get("rope_type") == "linear":
        # gemma-3-4b and larger stretch positions 8x on the global layers only; llama.cpp applies
        # rope.scaling.factor to non-SWA layers and keeps its SWA scale at 1.
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    layer_types = list(getattr(config, "layer_types", None) or [])
    if config.sliding_window and "sliding_attention" in layer_types:
        writer.add_sliding_window(config.sliding_window)
        # Without this key llama.cpp assumes Gemma 3's fixed pattern (every 6th layer global); one flag per layer
        # (true = sliding window) states the config's own layer_types.
        writer.add_sliding_window_pattern([kind_ == "sliding_attention" for kind_ in layer_types])
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))

    # Tokenizer: SentencePiece-BPE ("llama") with Gemma's settings: <bos> added, no <eos>, no space prefix.
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    # llama.cpp stops generation at every end-of-generation token: <eos> and the EOT token (the end of a turn).
    writer.add_eot_token_id(end_of_turn)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    vocab_size = len(tokens)
    for key, gguf_name in names.items():
        tensor = state_dict[key]
        if gguf_name in ("token_embd.weight", "output.weight"):
            if tensor.shape[0] < vocab_size:
                raise UserError(f"{key} has {tensor.shape[0]} rows but the tokenizer {vocab_size} tokens")
            # As llama.cpp's converter does: rows past the tokenizer's last id (padding of the 4B's vocabulary,
            # 262208 rows) are dropped, so the token count and the embedding agree.
            tensor = tensor[:vocab_size]
        data, raw_type = _as_array(tensor, gguf_name, kind)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile: our chat format (gemma3.jinja) in Ollama's Go-template syntax, a system message folded
    into the first user turn, and <end_of_turn> as the stop sequence. Ollama adds <bos> itself (add_bos_token)."""
    template = (
        '{{- $system := "" }}\n'
        '{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- end }}{{- end }}\n'
        "{{- $first := true }}\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        '{{- if eq .Role "user" }}<start_of_turn>user\n'
        "{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
        "{{ $first = false }}{{ if $last }}<start_of_turn>model\n{{ end }}\n"
        '{{- else if eq .Role "assistant" }}<start_of_turn>model\n'
        "{{ .Content }}{{ if not $last }}<end_of_turn>\n{{ end }}\n"
        "{{- end }}\n"
        "{{- end }}"
    )
    return (
        f"FROM ./{gguf_name}\n\n"
        f'TEMPLATE """{template}"""\n\n'
        'PARAMETER stop "<end_of_turn>"\n'
        "PARAMETER temperature 1.0\n"
        "PARAMETER top_k 64\n"
        "PARAMETER top_p 0.95\n"
    )


def readme(stem: str, kind: str, multimodal: bool) -> str:
    lines = [
        f"# {stem}",
        "",
        f"A Gemma 3 model merged from a LoRA adapter and converted to GGUF ({kind}) for llama.cpp and Ollama.",
        "",
    ]
    if multimodal:
        lines += ["Text only: the language model was exported; the vision tower was left out (no image input).", ""]
    lines += [
        "```bash",
        f"ollama create {stem} -f Modelfile     # then: ollama run {stem}",
        f"llama-cli -m {stem}.gguf -cnv          # chat in the terminal with the built-in Gemma 3 template",
        "```",
        "",
        "Generation stops at `<end_of_turn>` (the end of the model's turn).",
        "",
    ]
    return "\n".join(lines)
