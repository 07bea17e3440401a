"""flex_attention block masks built in bands without torch.compile (patches/block_masks.py): the very BlockMask torch's
own builder makes, for transformers' packed, sliding and padded masks, however the query rows fall into bands."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from transformers import masking_utils
from transformers.models.gemma3 import modeling_gemma3 as gemma3

from gemma_sft import patches
from gemma_sft.patches import block_masks
from gemma_sft.patches.packed_block_masks import LAYOUT_FIELDS

FIELDS = LAYOUT_FIELDS


def assert_same_block_mask(ours, theirs):
    assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    for field in FIELDS:
        a, b = getattr(ours, field), getattr(theirs, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), field
    assert ours.mask_mod is theirs.mask_mod or ours.mask_mod.__code__ is theirs.mask_mod.__code__


def packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


@pytest.mark.parametrize("marked", [False, True])  # evaluated through vmap; called once on broadcast indices
@pytest.mark.parametrize("band_pairs", [2**27, 300 * 128, 128 * 128])  # one band; several; one block row each
def test_same_block_mask_as_torch_for_packed_rows_in_any_bands(monkeypatch, band_pairs, marked):
    monkeypatch.setattr(block_masks, "BAND_TOKEN_PAIRS", band_pairs)
    sequences = torch.repeat_interleave(torch.tensor([0, 1, 2, 3]), torch.tensor([300, 41, 600, 59]))[None]
    window = 260  # over two blocks: some blocks are whole

    def sliding_in_sequence(b, h, q, kv):
        return (kv <= q) & (kv > q - window) & (sequences[b, q] == sequences[b, kv])

    sliding_in_sequence.broadcasts = marked
    assert block_masks.broadcasts(sliding_in_sequence) is marked
    ours = block_masks.create_block_mask_in_bands(sliding_in_sequence, 1, None, 1000, 1000, device="cpu")
    assert_same_block_mask(ours, create_block_mask(sliding_in_sequence, 1, None, 1000, 1000, device="cpu"))
    assert ours.full_kv_num_blocks.sum() > 0 and ours.kv_num_blocks.sum() > 0  # both kinds of block occur


def test_transformers_masks_are_torchs_with_padding_batches_and_heads(monkeypatch, tiny_model_dir):
    """The masks Gemma 3 builds (packed positions in one row, padding in the other) through the patched builder
    equal those torch's eager builder makes, for both layer types."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config._attn_implementation = "flex_attention"
    config.sliding_window = 96
    length = 700  # not a multiple of the 128-token block
    position_ids = torch.cat([packed_positions([250, 330, 120]), torch.arange(length)[None]])
    padding = torch.ones(2, length, dtype=torch.long)
    padding[1, 610:] = 0

    def build():
        kwargs = dict(config=config, inputs_embeds=torch.empty(2, length, 1), attention_mask=padding,
                      past_key_values=None, position_ids=position_ids)  # fmt: skip
        return gemma3.create_causal_mask(**kwargs), gemma3.create_sliding_window_causal_mask(**kwargs)

    patches.disable("block_masks_without_compile")
    monkeypatch.setattr(masking_utils, "_is_torch_greater_or_equal_than_2_6", False)  # torch's eager builder
    theirs = build()
    monkeypatch.setattr(block_masks, "BAND_TOKEN_PAIRS", 2 * 256 * 768)  # bands of 256 query rows
    try:
        patches.enable("block_masks_without_compile")
        ours = build()
    finally:
        patches.disable("block_masks_without_compile")
    for mask, reference in zip(ours, theirs):
        assert block_masks.broadcasts(mask.mask_mod)  # transformers' functions: one call on broadcast indices
        assert_same_block_mask(mask, reference)


def test_nothing_is_compiled(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called")

    monkeypatch.setattr(torch, "compile", refuse)

    def causal(b, h, q, kv):
        return kv <= q

    with pytest.raises(AssertionError, match=r"torch.compile called"):  # what transformers' call would do
        create_block_mask(causal, 1, None, 256, 256, device="cpu", _compile=True)
    ours = block_masks.create_block_mask_in_bands(causal, 1, None, 256, 256, device="cpu", _compile=True)
    assert_same_block_mask(ours, create_block_mask(causal, 1, None, 256, 256, device="cpu"))


def test_applies_only_to_flex_attention():
    from types import SimpleNamespace

    entry = patches.BY_SWITCH["block_masks_without_compile"]
    for implementation, expected in (("flex_attention", True), ("sdpa", False), ("eager", False)):
        assert entry.applies(None, None, SimpleNamespace(attn_implementation=implementation)) is expected
