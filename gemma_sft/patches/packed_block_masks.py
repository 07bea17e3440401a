"""flex_attention block masks for packed rows, kept in storage that stays put so that a CUDA graph can read them.

transformers builds a new BlockMask object for every packed batch: new tensors, and a mask function closed over a new
tensor of sequence numbers. A captured graph reads the addresses it saw at capture, so here each row shape gets one
set of masks whose tensors (the block layout and the sequence numbers the mask function reads) are refilled in place
for each batch. The mask functions are transformers' own rules for packed rows (a token sees the earlier tokens of its
own sequence; in sliding layers only the last `sliding_window` of them), one function for both layer types so that
flex_attention compiles once; `matches` checks them against the masks transformers builds, token by token, before
any graph uses them.
"""

import torch

# BlockMask's tensor fields: the block layout create_block_mask computes
LAYOUT_FIELDS = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)  # fmt: skip
ROWS_PER_CHECK = 2048  # query rows compared at a time by `matches` (2,048 x 16,384 booleans = 32 MiB)


def sequence_numbers(position_ids: torch.Tensor) -> torch.Tensor:
    """Which packed sequence each token belongs to: a new one wherever the position does not follow on by one (as
    transformers' find_packed_sequence_indices counts them)."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def same_layout(ours, theirs) -> bool:
    """Whether two block masks have the same block layout (the LAYOUT_FIELDS, present in both or in neither)."""
    return theirs is not None and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in ((getattr(ours, f), getattr(theirs, f)) for f in LAYOUT_FIELDS)
    )


class PackedBlockMasks:
    """One row shape's masks ("full_attention", "sliding_attention": BlockMask), refilled in place by `refill`."""

    def __init__(self, config, position_ids: torch.Tensor):
        from transformers import masking_utils

        # whichever builder transformers' own masks use (block_masks.py's when block_masks_without_compile is on)
        self.create_block_mask = masking_utils.create_block_mask
        self.shape = tuple(position_ids.shape)
        self.sequences = sequence_numbers(position_ids)  # read by the mask functions, refilled in place
        self.mask_functions = {
            name: self.rule(config.sliding_window if name == "sliding_attention" else self.shape[1])
            for name in sorted(set(config.layer_types))
        }
        self.masks = {name: self.build(function) for name, function in self.mask_functions.items()}

    def rule(self, window: int):
        """A token sees the earlier tokens of its own sequence, the last `window` of them. Both layer types get this
        one function, each with its window as a tensor (a full layer's spans the row): torch.compile then builds one
        flex_attention kernel for both, where two functions, or a window held as a Python number, compile twice."""
        sequences, window = self.sequences, torch.tensor(window, device=self.sequences.device)

        def in_sequence_within_window(batch, head, q, kv):
            return (kv <= q) & (kv > q - window) & (sequences[batch, q] == sequences[batch, kv])

        in_sequence_within_window.broadcasts = True  # see block_masks.broadcasts
        return in_sequence_within_window

    def build(self, mask_function):
        batch, length = self.shape
        # built like transformers' own masks (_compile: torch's eager builder would hold every token pair at once)
        return self.create_block_mask(mask_function, batch, None, length, length, device=self.sequences.device,
                                      _compile=self.sequences.is_cuda)  # fmt: skip

    def refill(self, position_ids: torch.Tensor) -> dict:
        """Point the masks at this batch: new sequence numbers, then the block layout they give, copied in place."""
        with torch.no_grad():
            self.sequences.copy_(sequence_numbers(position_ids))
            for name, function in self.mask_functions.items():
                fresh = self.build(function)
                for field in LAYOUT_FIELDS:
                    static, value = getattr(self.masks[name], field), getattr(fresh, field)
                    if static is not None:
                        static.copy_(value)
        return self.masks

    def matches(self, their_masks: dict) -> str | None:
        """None if `their_masks` (transformers' masks for the batch last refilled) allow exactly the token pairs ours
        allow, else what differs."""
        batch, length = self.shape
        kv = torch.arange(length, device=self.sequences.device)
        head = torch.tensor(0, device=kv.device)
        for name, ours in self.masks.items():
            theirs = their_masks.get(name)
            if theirs is None or tuple(theirs.kv_indices.shape[-2:]) != tuple(ours.kv_indices.shape[-2:]):
                return f"{name}: no mask or another block layout"
            for b in range(batch):
                index = torch.tensor(b, device=kv.device)
                for start in range(0, length, ROWS_PER_CHECK):
                    q = torch.arange(start, min(start + ROWS_PER_CHECK, length), device=kv.device)[:, None]
                    allowed = ours.mask_mod(index, head, q, kv[None, :])
                    if not torch.equal(allowed, theirs.mask_mod(index, head, q, kv[None, :]).expand_as(allowed)):
                        return f"{name}: row {b}, query tokens {start}-{start + len(q) - 1} see other keys"
            if not torch.equal(ours.to_dense(), theirs.to_dense()):
                return f"{name}: another block layout"
        return None
