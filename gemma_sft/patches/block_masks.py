"""flex_attention block masks built without torch.compile.

transformers builds each BlockMask through torch.compile(create_block_mask), so as not to hold every token pair at
once. On a machine whose kernel cache is empty that compilation dominates the first step at long rows: the Triton sort
it generates for the block indices compiles slower the more blocks a row has (pytorch/pytorch#182060). Here the mask
function is evaluated as torch's eager builder evaluates it (vmap over batch, head, query and key), but a band of query
rows at a time, so memory stays at one band; each band is summed to its blocks, and torch assembles the BlockMask from
those block counts exactly as create_block_mask does. The same BlockMask, nothing compiled, milliseconds per mask.
"""

import torch

BAND_TOKEN_PAIRS = 2**27  # query-key pairs evaluated at a time: 128 MiB of booleans


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def create_block_mask_in_bands(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False,
                               separate_full_blocks=True, **options):  # fmt: skip
    """torch's create_block_mask (same arguments, same BlockMask), evaluated in bands of query rows, never compiled."""
    from torch.nn.attention import flex_attention as flex

    if any(options.values()):  # e.g. compute_dq_write_order: torch's own builder
        return flex.create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, _compile,
                                      separate_full_blocks, **options)  # fmt: skip
    batch, heads = B or 1, H or 1
    q_block, kv_block = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else BLOCK_SIZE
    kv_padded = _round_up(KV_LEN, kv_block)
    rows = max(q_block, BAND_TOKEN_PAIRS // (batch * heads * kv_padded) // q_block * q_block)
    sums = []
    for start in range(0, Q_LEN, rows):
        length = min(rows, Q_LEN - start)
        band = _evaluate(mask_mod, batch, heads, start, length, KV_LEN, device)
        band = torch.nn.functional.pad(band, (0, kv_padded - KV_LEN, 0, _round_up(length, q_block) - length))
        blocks = band.view(batch, heads, -1, q_block, kv_padded // kv_block, kv_block)
        sums.append(blocks.sum(dim=(3, 5)))
    block_sums = torch.cat(sums, dim=2)
    whole = q_block * kv_block
    if separate_full_blocks:
        partial = ((block_sums > 0) & (block_sums < whole)).to(torch.int8)
        full = (block_sums == whole).to(torch.int8)
    else:
        partial, full = (block_sums > 0).to(torch.int8), None
    return flex._create_sparse_block_from_block_mask((partial, full), mask_mod, (Q_LEN, KV_LEN), q_block, kv_block)


def broadcasts(mask_mod) -> bool:
    """Whether `mask_mod` may be called once on broadcast index tensors instead of through vmap: transformers' mask
    functions and those marked so (elementwise operations and indexing only; tests/test_block_masks.py compares)."""
    return getattr(mask_mod, "broadcasts", False) or getattr(mask_mod, "__module__", "").startswith("transformers.")


def _evaluate(mask_mod, batch: int, heads: int, start: int, length: int, kv_length: int, device) -> torch.Tensor:
    """The mask over query rows start..start+length: (batch, heads, length, kv_length) booleans."""
    from torch.nn.attention import flex_attention as flex

    if broadcasts(mask_mod):  # one call: vmap's per-operation cost is most of a mask's time at these sizes
        b, h, q, kv = (torch.arange(n, device=device).view([-1 if i == d else 1 for i in range(4)])
                       for d, n in enumerate((batch, heads, length, kv_length)))  # fmt: skip
        return mask_mod(b, h, q + start, kv).expand(batch, heads, length, kv_length)

    def band_mask(b, h, q, kv):
        return mask_mod(b, h, q + start, kv)

    return flex.create_mask(band_mask, batch, heads, length, kv_length, device)


# Putting it in place (gemma_sft/patches/registry.py turns it on and off)
def install() -> None:
    from torch.nn.attention import flex_attention as flex
    from transformers import masking_utils

    flex._create_sparse_block_from_block_mask, flex.create_mask  # noqa: B018 - a moved name fails here, not mid-run
    if masking_utils.create_block_mask is not create_block_mask_in_bands:
        masking_utils.create_block_mask = create_block_mask_in_bands


def uninstall() -> None:
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import masking_utils

    if masking_utils.create_block_mask is create_block_mask_in_bands:
        masking_utils.create_block_mask = create_block_mask
