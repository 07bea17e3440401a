"""Token ids and the answer mask of chat conversations, found without the tokenizer's character offsets.

transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` encodes the rendered text with every
token's character offsets, then asks which token holds the first and the last character of each `{% generation %}`
span. The offsets cost about as much as the encoding itself. Gemma 3's tokenizer (BPE with byte fallback, no
pre-tokenizer, a normalizer that only writes a space as "▁") turns the text into tokens piece by piece, so the number
of UTF-8 bytes each token stands for is a property of the token alone, and the tokens' running byte count locates
every span. `tokenize` does that and returns what transformers returns, token for token (tests/test_answer_mask.py).

It checks every row: where the bytes do not add up to the rendered text (a literal "▁" in it, an unknown token), the
row goes through transformers instead, as does every row of a tokenizer of another kind. Switch:
`fast_answer_mask`, a data setting of the recipe; checked with transformers 5.17.0 and tokenizers 0.23.3.
"""

import contextlib
import json
import re

import numpy as np

_SPACE = "\u2581"  # how the normalizer writes a space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # byte fallback: one byte of a character the vocabulary lacks


def reference(tokenizer, conversations: list[list[dict]]) -> tuple[list[list[int]], list[list[int]]]:
    """transformers' own token ids and answer masks."""
    encoded = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return [list(ids) for ids in encoded["input_ids"]], [list(mask) for mask in encoded["assistant_masks"]]


def token_bytes(tokenizer) -> np.ndarray | None:
    """The UTF-8 bytes of text each token id stands for, or None where that is not a property of the token alone."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    known = getattr(tokenizer, "_gemma_sft_token_bytes", None)
    if known is None or known[0] is not backend or known[1] != _pipeline(backend):  # a copy, or a changed pipeline
        known = (backend, _pipeline(backend), _token_bytes(backend))
        with contextlib.suppress(AttributeError):
            tokenizer._gemma_sft_token_bytes = known  # built once per tokenizer
    return known[2]


def _pipeline(backend) -> str:
    """What turns text into pieces before the model runs: a change to it changes what a token stands for."""
    return repr((backend.normalizer, backend.pre_tokenizer)) if backend is not None else ""


def _token_bytes(backend) -> np.ndarray | None:
    if backend is None:
        return None
    from tokenizers.models import BPE

    # Each part asked for alone: the whole tokenizer as JSON is tens of megabytes to write and parse again
    normalizer = None if backend.normalizer is None else json.loads(backend.normalizer.__getstate__())
    space_only = normalizer is None or normalizer == {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
    bpe = isinstance(backend.model, BPE)
    if not bpe or not backend.model.byte_fallback or backend.pre_tokenizer is not None or not space_only:
        return None
    vocabulary = backend.get_vocab(with_added_tokens=True)
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    table = np.zeros(max(vocabulary.values()) + 1, dtype=np.int64)
    for piece, index in vocabulary.items():
        if piece in added:  # special tokens are matched in the raw text as written
            table[index] = len(piece.encode())
        elif _BYTE_TOKEN.fullmatch(piece):
            table[index] = 1
        else:
            table[index] = len(piece.replace(_SPACE, " ").encode())
    return table


def ids_and_masks(
    tokenizer, conversations: list[list[dict]], fast: bool = True
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and answer masks (1 on each answer and its <end_of_turn>), equal to `reference`'s; fast: found
    from token byte lengths where the tokenizer allows (the fast_answer_mask switch), else transformers' own."""
    table = token_bytes(tokenizer) if fast else None
    if table is None or not conversations:
        return reference(tokenizer, conversations)
    return _by_byte_lengths(tokenizer, conversations, table)


def _by_byte_lengths(tokenizer, conversations: list[list[dict]], table: np.ndarray):
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, spans = render_jinja_template(
        conversations=conversations, chat_template=tokenizer.get_chat_template(), return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )  # fmt: skip
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    all_ids, masks, unsure = [], [], []
    for row, (text, encoding, row_spans) in enumerate(zip(texts, encodings, spans)):
        ids = encoding.ids
        ends = np.cumsum(table[ids])  # the byte offset where each token ends
        all_ids.append(ids)
        if not ids or _SPACE in text or ends[-1] != len(text.encode()) or any(s >= e for s, e in row_spans):
            unsure.append(row)
            masks.append(None)
        else:
            masks.append(_mask(text, ends, row_spans))
    if unsure:
        ids, checked = reference(tokenizer, [conversations[row] for row in unsure])
        for row, row_ids, mask in zip(unsure, ids, checked):
            all_ids[row], masks[row] = row_ids, mask
    return all_ids, masks


def _mask(text: str, ends: np.ndarray, spans: list[tuple[int, int]]) -> list[int]:
    """1 from the token holding each span's first character to the token holding its last, as transformers marks
    them; the token holding a character is the one holding its first byte."""
    mask = [0] * len(ends)
    for start, end in spans:
        first = int(np.searchsorted(ends, len(text[:start].encode()), side="right"))
        last = int(np.searchsorted(ends, len(text[: end - 1].encode()), side="right"))
        stop = last + 1 if last else len(ends)  # transformers reads a last token of 0 as "to the end"
        mask[first:stop] = [1] * max(stop - first, 0)
    return mask


def tokenize_many(tokenizer, conversations: list[list[dict]], fast_mask: bool = True) -> list[dict]:
    """Token ids and the answer mask (1 on each answer and its <end_of_turn>, from the chat template's markers) for
    each conversation; one call for several is a few times faster than one each. fast_mask: the same ids and mask
    found without character offsets (gemma_sft/data/answer_mask.py), else transformers' own."""
    if not conversations:
        return []
    ids, masks = ids_and_masks(tokenizer, conversations, fast_mask)
    return [{"input_ids": row_ids, "assistant_masks": mask} for row_ids, mask in zip(ids, masks)]


def tokenize(tokenizer, messages: list[dict]) -> dict:
    """`tokenize_many` for one conversation."""
    return tokenize_many(tokenizer, [messages])[0]
