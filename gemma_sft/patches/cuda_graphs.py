"""CUDA graphs for training: the decoder stack's forward and backward passes replayed, not re-issued from Python.

Each step issues every kernel of every layer from Python: about 8,500 launches a step on the 4B, and for short steps
(unpacked rows; packed rows of 8,192 tokens) the GPU finishes them faster than the host issues them. Here the
language model's body (embedding, decoder layers with their checkpointing, final norm) is captured once per batch
shape as a pair of CUDA graphs, one for the forward pass and one for the backward pass, and replayed on later steps of
that shape. The output head, the loss and the optimizer stay eager.

Replays reuse the tensors, weights and random stream of the capture: the same arithmetic, with dropout drawn afresh
on each replay. All graphs share one memory pool, which is safe because every forward replay is followed by its own
backward replay before any other graph runs (one training micro-step at a time). Masks that are tensors are inputs
like the tokens; flex_attention's block masks for packed rows are objects, so each row shape keeps one set whose
storage is refilled in place (packed_block_masks.py). Anything else (evaluation, no gradients, generation, extra
outputs, a cache) runs the model's own forward.
"""

import os

import torch

from gemma_sft import UserError
from gemma_sft.patches import async_steps
from gemma_sft.patches.packed_block_masks import PackedBlockMasks, same_layout

MAX_GRAPHS = 64  # batch shapes captured per model; later new shapes run eagerly
WARMUP_RUNS = 2  # eager passes before a capture: lazy initialisation, Triton compilation, cuBLAS workspaces
# what TRL's padding-free collator adds to a packed batch for flash attention's variable-length kernels
PACKED_SEQUENCE_HINTS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})


class _Captured:
    """One batch shape's graphs with their static inputs, output and gradients."""

    def __init__(self, run, inputs: list, params: list, pool):
        # leaves of their own, refilled before each replay; a gradient for those that need one (inputs_embeds under
        # reentrant checkpointing) flows back to the caller's tensor through _Replay
        self.inputs = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        self.grad_targets = [t for t in self.inputs if t is not None and t.requires_grad] + params
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                out = run(*self.inputs)
                torch.autograd.grad(out, self.grad_targets, torch.ones_like(out), allow_unused=True)
                del out
        torch.cuda.current_stream().wait_stream(side)
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=pool):
            self.output = run(*self.inputs)
        self.grad_output = torch.empty_like(self.output)
        with torch.cuda.graph(self.backward_graph, pool=pool):
            self.grads = torch.autograd.grad(self.output, self.grad_targets, self.grad_output, allow_unused=True)
        self.output_value = self.output.detach()  # what callers get; the autograd graph of the capture is gone


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, captured, *grad_targets):
        captured.forward_graph.replay()
        ctx.captured = captured
        return captured.output_value.detach()

    @staticmethod
    def backward(ctx, grad_output):
        captured = ctx.captured
        captured.grad_output.copy_(grad_output)
        captured.backward_graph.replay()
        # the static gradient tensors themselves, not detached views: autograd then adds them into .grad (or copies
        # them there) instead of taking their memory, which the next replay overwrites
        return None, *captured.grads


class GraphedStack:
    """The training forward of a transformers Gemma 3 text model, through CUDA graphs where it can be."""

    def __init__(self, text_model):
        self.text_model = text_model
        self.own_forward = type(text_model).forward.__get__(text_model)
        self.captured: dict = {}
        self.packed_masks: dict = {}  # row shape -> PackedBlockMasks
        self.pool = None
        self.replays = 0
        self.failed = None  # the capture error, if one failed
        self.unmatched = None  # why transformers' packed masks and ours differed, if they did (then run eagerly)
        self.handed_down = 0  # batches whose masks the multimodal body took from here (hand_down_masks)

    def eligible(self, input_ids, inputs_embeds, past_key_values, use_cache, kwargs) -> bool:
        x = input_ids if inputs_embeds is None else inputs_embeds
        hints = self.ignored_hints()
        return (
            self.failed is None
            and self.text_model.training
            and torch.is_grad_enabled()
            and x is not None
            and x.is_cuda
            and (input_ids is None) != (inputs_embeds is None)
            and past_key_values is None
            and not use_cache
            and not getattr(self.text_model.config, "use_bidirectional_attention", False)
            and all(value is None or value is False or name in hints for name, value in kwargs.items())
            and not torch.cuda.is_current_stream_capturing()
        )

    def ignored_hints(self) -> frozenset:
        """The batch keys only flash attention reads: TRL's packed batches carry them, sdpa and flex ignore them."""
        implementation = getattr(self.text_model.config, "_attn_implementation", None) or ""
        return frozenset() if "flash" in implementation else PACKED_SEQUENCE_HINTS

    def masks(self, attention_mask, x, position_ids) -> dict:
        """The per-layer-type masks the model's forward would build, built here, eagerly (they read the padding)."""
        if isinstance(attention_mask, dict):
            return dict(attention_mask)
        from transformers.models.gemma3 import modeling_gemma3 as gemma3

        shape_only = torch.empty((*x.shape[:2], 1), dtype=self.text_model.embed_tokens.weight.dtype, device=x.device)
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        kwargs = dict(
            config=self.text_model.config,
            inputs_embeds=shape_only,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        return {
            "full_attention": gemma3.create_causal_mask(**kwargs),
            "sliding_attention": gemma3.create_sliding_window_causal_mask(**kwargs),
        }

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, use_cache=None, return_dict=None, **kwargs):  # fmt: skip
        # return_dict: the output is a ModelOutput either way (transformers 5 text models always return one)
        if not self.eligible(input_ids, inputs_embeds, past_key_values, use_cache, kwargs):
            return self.own_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                    **kwargs)  # fmt: skip
        from transformers.modeling_outputs import BaseModelOutputWithPast

        x = input_ids if inputs_embeds is None else inputs_embeds
        packed = self.packed_flex_masks(attention_mask, x, position_ids)
        if packed is not None:
            masks, static_masks = packed, packed
        else:
            masks, static_masks = self.masks(attention_mask, x, position_ids), None
            if any(mask is not None and not isinstance(mask, torch.Tensor) for mask in masks.values()):
                # block masks of unpacked rows or of rows whose masks differ from ours: built per batch, run eagerly
                return self.own_forward(input_ids=input_ids, attention_mask=masks, position_ids=position_ids,
                                        inputs_embeds=inputs_embeds, use_cache=False)  # fmt: skip
        mask_types = sorted(masks)
        inputs = [x, position_ids, *(() if static_masks else (masks[name] for name in mask_types))]
        key = (
            inputs_embeds is None,
            x.requires_grad,
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
            *(None if t is None else (tuple(t.shape), t.dtype) for t in inputs),
            tuple(mask_types),
            static_masks is not None,
        )
        captured = self.captured.get(key)
        if captured is None:
            if len(self.captured) >= MAX_GRAPHS:
                return self.own_forward(input_ids=input_ids, attention_mask=masks, position_ids=position_ids,
                                        inputs_embeds=inputs_embeds, use_cache=False)  # fmt: skip
            captured = self.capture(key, inputs, inputs_embeds is None, mask_types, static_masks)
        with torch.no_grad():
            for static, value in zip(captured.inputs, inputs):
                if static is not None:
                    static.copy_(value)
        needs_grad = [t for t in inputs if t is not None and t.requires_grad]
        hidden = _Replay.apply(captured, *needs_grad, *captured.grad_targets[len(needs_grad) :])
        self.replays += 1
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=None)

    def packed_flex_masks(self, attention_mask, x, position_ids) -> dict | None:
        """For packed rows under flex_attention: this row shape's masks, refilled for this batch; else None.

        A text-only model is handed no mask (it would build the packed masks itself from the positions); Gemma 3's
        multimodal wrapper builds them and hands them down, and then they must have our block layout, every batch.
        """
        config = self.text_model.config
        if (
            self.unmatched is not None
            or position_ids is None
            or getattr(config, "_attn_implementation", None) != "flex_attention"
            or not (attention_mask is None or isinstance(attention_mask, dict))
        ):
            return None
        position_ids = position_ids.expand(x.shape[0], -1)
        given = attention_mask
        if given is not None and any(type(mask).__name__ != "BlockMask" for mask in given.values()):
            return None
        packed = self.packed_masks.get(tuple(position_ids.shape))
        if packed is None:
            packed = PackedBlockMasks(config, position_ids)
            differs = packed.matches(given if given is not None else self.masks(None, x, position_ids))
            if differs is not None:
                self.unmatched = differs
                _log_once(f"cuda_graphs: packed rows train without graphs: flex_attention masks differ ({differs})")
                return None
            self.packed_masks[tuple(position_ids.shape)] = packed
            return packed.masks
        if given is not None and all(given.get(name) is mask for name, mask in packed.masks.items()):
            return packed.masks  # ours, refilled for this batch by the multimodal body's hook (hand_down_masks)
        masks = packed.refill(position_ids)
        if given is not None and not all(same_layout(masks[name], given.get(name)) for name in masks):
            return None  # this batch's masks are not plain packed rows (e.g. images): the given masks, eagerly
        return masks

    def capture(self, key, inputs, by_ids: bool, mask_types, static_masks=None):
        def run(x, position_ids, *mask_values):
            given = {"input_ids": x} if by_ids else {"inputs_embeds": x}
            masks = static_masks or dict(zip(mask_types, mask_values))
            return self.own_forward(**given, attention_mask=masks, position_ids=position_ids,
                                    use_cache=False).last_hidden_state  # fmt: skip

        params = [p for p in self.text_model.parameters() if p.requires_grad]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # autocast's cache of cast weights would hand tensors of the capture to later eager code: off while capturing
        autocast = torch.autocast(
            "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
            cache_enabled=False,
        )  # fmt: skip
        try:
            with autocast:
                captured = _Captured(run, inputs, params, self.pool)
        except torch.OutOfMemoryError:  # the step needs less memory, not a run without graphs: told as such upstream
            raise
        except RuntimeError as exc:  # an operation that cannot be captured; the random generator is left mid-capture
            self.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            raise UserError(
                f"cuda_graphs: capturing the model's training pass failed ({self.failed}); pass --cuda_graphs false "
                "to train without CUDA graphs"
            ) from exc
        self.captured[key] = captured
        torch.cuda.empty_cache()  # the warm-up passes' memory, now unused, back to the card
        return captured


def _log_once(message: str) -> None:
    from transformers.utils import logging

    logging.get_logger("gemma_sft").warning_once(message)


def hand_down_masks(stack: GraphedStack):
    """A forward pre-hook for Gemma 3's multimodal body (Gemma3Model), whose forward builds the packed rows' block
    masks each step (and reads the GPU on the way: transformers' find_packed_sequence_indices) before handing them to
    the text model, where GraphedStack would check them against its own, reading the GPU again. For a text-only
    training batch whose row shape the stack has already matched against transformers' masks (packed_flex_masks),
    the stack's masks, refilled for the batch, are handed down instead: the same masks, built once, nothing read."""

    def hook(body, args, kwargs):
        position_ids, input_ids = kwargs.get("position_ids"), kwargs.get("input_ids")
        if (
            args
            or not async_steps.enabled  # part of that switch: it takes the host's reads out of a step
            or not (body.training and torch.is_grad_enabled())
            or stack.unmatched is not None
            or input_ids is None
            or not input_ids.is_cuda
            or position_ids is None
            or any(kwargs.get(name) is not None for name in ("attention_mask", "pixel_values", "token_type_ids",
                                                             "past_key_values", "inputs_embeds"))
        ):  # fmt: skip
            return None
        position_ids = position_ids.expand(input_ids.shape[0], -1)
        packed = stack.packed_masks.get(tuple(position_ids.shape))
        if packed is None:
            return None  # the first batch of this shape: transformers builds the masks and the stack checks them
        stack.handed_down += 1
        return args, {**kwargs, "attention_mask": dict(packed.refill(position_ids))}

    return hook


def graph_text_models(model) -> int:
    """Route the training forward of each Gemma 3 text model inside `model` through GraphedStack, and let a
    multimodal body hand the stack's packed masks down (hand_down_masks); returns how many text models."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3Model, Gemma3TextModel

    wrapped = 0
    for module in model.modules():
        if isinstance(module, Gemma3TextModel):
            if not isinstance(module.__dict__.get("forward"), GraphedStack):
                module.forward = GraphedStack(module)
            wrapped += 1
    for module in model.modules():
        if isinstance(module, Gemma3Model) and not getattr(module, "_gemma_sft_hands_down_masks", False):
            stack = module.language_model.__dict__.get("forward")
            if isinstance(stack, GraphedStack):
                module.register_forward_pre_hook(hand_down_masks(stack), with_kwargs=True)
                module._gemma_sft_hands_down_masks = True
    return wrapped


# Putting it in place (gemma_sft/patches/registry.py turns it on and off)
def applies(speed, training_args, model_args) -> bool:
    # several processes (DDP, FSDP, ZeRO-3) and torch.compile are untried with graphs
    return (
        torch.cuda.is_available() and not training_args.torch_compile and int(os.environ.get("WORLD_SIZE", "1")) == 1
    )
