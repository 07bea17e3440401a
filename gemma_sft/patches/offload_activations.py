"""Checkpointed layer inputs held in pinned host memory instead of on the GPU.

With gradient checkpointing each decoder layer keeps one tensor through the step: its input, 2 bytes x hidden size per
token (2.7 GiB on the 4B at 16,384 tokens). Here each one is copied to a pinned host buffer on a side stream while its
layer computes, its GPU memory is released once the copy is done, and in the backward pass it comes back one layer
ahead of the recomputation that needs it. The GPU then holds two or three of them at a time instead of all of them.
The arithmetic is unchanged; each step moves those bytes over PCIe once each way.

With `kept_outputs_too` (recipe key offload_kept_outputs) the outputs that keep_mlp_outputs (and keep_qkv_outputs)
hold through the step (fused_qlora.py: as many bytes per layer as its input for the MLP's) travel the same way: sent
while the layer goes on, brought back when the backward pass reaches the layer before it, handed to the recomputation
in place of the GPU copy.

The streams, events and host buffers are set up per layer, so the copies can be captured inside cuda_graphs.py's
graphs and replayed: a host buffer is never freed or moved while a captured graph may still copy into it.
"""

import contextlib
import weakref

import torch

from gemma_sft import hardware
from gemma_sft.patches import fused_qlora

kept_outputs_too = False  # also the outputs fused_qlora keeps (switch offload_kept_outputs)


class _Pass:
    """One forward pass's offloaded inputs, until its backward pass has taken them all back (or dropped them)."""

    def __init__(self, slot: int):
        self.slot = slot  # which set of host buffers it writes: another pass may still wait for its backward
        self.saved: list = []  # weak references to its _Saved, in layer order
        self.fetched: dict = {}  # position -> (GPU tensor, copy done): inputs brought back ahead of their layer
        self.taken = 0

    def done(self) -> bool:
        return self.taken >= len(self.saved) or all(saved() is None for saved in self.saved)


class _Saved:
    """What the autograd graph keeps instead of a layer's input: where its bytes are on the host."""

    __slots__ = ("__weakref__", "device", "dtype", "host", "kept", "owner", "position", "shape")

    def __init__(self, owner: _Pass, host, tensor: torch.Tensor):
        self.owner, self.position, self.host = owner, len(owner.saved), host
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.kept: list = []  # weak references to the layer's KeptOnHost outputs


class KeptOnHost:
    """A kept projection output (fused_qlora.py) held on the host: what the layer's recomputation takes back."""

    __slots__ = ("__weakref__", "device", "dtype", "fetched", "host", "offload", "shape")

    def __init__(self, offload, host, tensor: torch.Tensor):
        self.offload, self.host, self.fetched = offload, host, None
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device

    def prefetch(self) -> None:
        if self.fetched is None:
            self.fetched = self.offload.fetch(self)

    def take(self) -> torch.Tensor:
        """The output back on its device, once its copy is done (in stream order)."""
        self.prefetch()
        fetched, self.fetched = self.fetched, None
        return _arrived(*fetched)


def _arrived(tensor: torch.Tensor, done) -> torch.Tensor:
    """A tensor fetched from the host, once the compute stream has waited for its copy (`done`; None on CPU)."""
    if done is not None:
        torch.cuda.current_stream(tensor.device).wait_event(done)
    return tensor


class ActivationOffload:
    """One model's offloaded layer inputs: host buffers per layer, the side stream, the copies in flight."""

    def __init__(self):
        self.buffers: dict = {}  # (layer, slot) -> pinned uint8 buffer (never shrunk: graphs may hold its address)
        self.retired: list = []  # outgrown buffers, kept alive for the graphs captured with them
        self.stream = None
        self.in_flight: list = []  # (GPU tensor, copy done) of this pass whose memory the compute stream still holds
        self.recording: _Pass | None = None  # the forward pass under way
        self.waiting: list = []  # passes whose backward has not taken all their inputs back
        self.offloaded = 0  # layer inputs sent to the host so far
        self.kept_offloaded = 0  # kept projection outputs sent to the host so far

    # forward ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def saving(self, layer, hidden_states: torch.Tensor):
        """While a checkpointed layer starts: its input, when autograd saves it, goes to the host."""

        # the input's address and shape, not the tensor: autograd keeps this function as long as what it saved,
        # and a reference to the tensor from here would keep it on the GPU
        address, shape = hidden_states.data_ptr(), hidden_states.shape

        def pack(tensor):
            if tensor.data_ptr() != address or tensor.shape != shape:
                return tensor  # the checkpoint's other inputs (an empty marker tensor): kept as they are
            return self.send(layer, tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, self.unpack):
            yield

    def new_pass(self) -> _Pass:
        # Training alternates forward and backward, so one set of host buffers serves. A second forward pass before
        # the first one's backward (two losses, one backward) writes another set instead of overwriting the first.
        self.waiting = [waiting for waiting in self.waiting if not waiting.done()]
        busy = {waiting.slot for waiting in self.waiting}
        started = _Pass(min(set(range(len(busy) + 1)) - busy))
        self.waiting.append(started)
        return started

    def send(self, layer, tensor: torch.Tensor) -> _Saved:
        if self.recording is None:  # the first layer of a new forward pass
            self.recording = self.new_pass()
        if tensor.is_cuda:  # the previous layer's tensors: copied by now, their memory can go
            self.release_in_flight(torch.cuda.current_stream(tensor.device))
        saved = _Saved(self.recording, self.copy_out((layer, self.recording.slot), tensor), tensor)
        self.recording.saved.append(weakref.ref(saved))
        self.offloaded += 1
        return saved

    def copy_out(self, key, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` copied into the host buffer `key`; on a GPU the copy runs on the side stream and the tensor's
        memory is let go once the compute stream has waited for it."""
        host = self.host_view(key, tensor)
        if tensor.is_cuda:
            compute = torch.cuda.current_stream(tensor.device)
            side = self.side_stream(tensor.device)
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                host.copy_(tensor, non_blocking=True)
            self.in_flight.append((tensor, side.record_event()))
        else:
            host.copy_(tensor)
        return host

    def send_kept(self, tensor: torch.Tensor):
        """A kept projection output of the layer being recorded, sent to the host; returns what stands in for it (the
        tensor itself outside an offloaded layer's first pass)."""
        layer = self.recording.saved[-1]() if self.recording is not None and self.recording.saved else None
        if layer is None:
            return tensor
        key = ("kept", layer.position, len(layer.kept), self.recording.slot)
        kept = KeptOnHost(self, self.copy_out(key, tensor), tensor)
        layer.kept.append(weakref.ref(kept))
        self.kept_offloaded += 1
        return kept

    def release_in_flight(self, compute) -> None:
        """The compute stream waits for the copies in flight, then lets their GPU tensors go (in stream order, so
        the memory is reused only after the copy has read it)."""
        for _, done in self.in_flight:
            compute.wait_event(done)
        self.in_flight = []

    def end_forward(self) -> None:
        """After the last decoder layer: every copy joins the compute stream (a captured graph must end joined)."""
        if self.in_flight:
            self.release_in_flight(torch.cuda.current_stream(self.in_flight[0][0].device))
        self.recording = None

    def before_final_norm(self, module, args) -> None:
        self.end_forward()

    # backward --------------------------------------------------------------------------------------------------
    def unpack(self, packed):
        if not isinstance(packed, _Saved):
            return packed
        owner = packed.owner
        tensor = _arrived(*(owner.fetched.pop(packed.position, None) or self.fetch(packed)))
        owner.taken += 1
        previous = owner.saved[packed.position - 1]() if packed.position > 0 else None
        if previous is not None and previous.position not in owner.fetched:  # the layer the backward reaches next
            owner.fetched[previous.position] = self.fetch(previous)
        for layer in (packed, previous):  # this layer's kept outputs (if not yet on their way) and the next one's
            for kept in (reference() for reference in (layer.kept if layer is not None else ())):
                if kept is not None:
                    kept.prefetch()
        return tensor

    def fetch(self, saved):
        """A _Saved input or a KeptOnHost output back on its device: (tensor, copy done or None on CPU)."""
        tensor = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
        if not tensor.is_cuda:
            return tensor.copy_(saved.host), None
        side = self.side_stream(tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the allocation is the compute stream's
        with torch.cuda.stream(side):
            tensor.copy_(saved.host, non_blocking=True)
        return tensor, side.record_event()

    # buffers and streams ---------------------------------------------------------------------------------------
    def host_view(self, key, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            if buffer is not None:
                self.retired.append(buffer)
            # pinned memory makes the copies asynchronous; double on growth so varying shapes allocate rarely
            size = nbytes if buffer is None else max(nbytes, 2 * buffer.numel())
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=tensor.is_cuda)
            self.buffers[key] = buffer
        return buffer[:nbytes].view(tensor.dtype).view(tensor.shape)

    def side_stream(self, device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream


class OffloadedCheckpoint:
    """A decoder layer's gradient checkpointing function whose saved input is offloaded."""

    def __init__(self, checkpoint, offload: ActivationOffload, layer):
        self.checkpoint, self.offload, self.layer = checkpoint, offload, layer
        # read like a functools.partial's by the other wrappers of this function (fused_qlora.keep_mlp_outputs)
        self.keywords = getattr(checkpoint, "keywords", {})

    def __call__(self, function, *args, **kwargs):
        if not args or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled():
            return self.checkpoint(function, *args, **kwargs)
        previous = fused_qlora.kept_output_stash
        if kept_outputs_too:  # the first pass of the layer hands its kept outputs over (send_kept)
            fused_qlora.kept_output_stash = self.offload.send_kept
        try:
            with self.offload.saving(self.layer, args[0]):
                return self.checkpoint(function, *args, **kwargs)
        finally:
            fused_qlora.kept_output_stash = previous


def offload_layer_inputs(model) -> int:
    """Offload the saved inputs of `model`'s checkpointed decoder layers; returns how many layers now do. Call once
    gradient checkpointing is on (the Trainer turns it on when training starts); calling again changes nothing."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel

    layers = 0
    for text_model in (m for m in model.modules() if isinstance(m, Gemma3TextModel)):
        offload = getattr(text_model, "activation_offload", None)
        if offload is None:
            offload = text_model.activation_offload = ActivationOffload()
            text_model.norm.register_forward_pre_hook(offload.before_final_norm)
        for index, layer in enumerate(text_model.layers):
            checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
            if not getattr(layer, "gradient_checkpointing", False) or checkpoint is None:
                continue
            if not isinstance(checkpoint, OffloadedCheckpoint):
                layer._gradient_checkpointing_func = OffloadedCheckpoint(checkpoint, offload, index)
            layers += 1
    return layers


# Putting it in place (gemma_sft/patches/registry.py turns it on and off)
def applies(speed, training_args, model_args) -> bool:
    # non-reentrant checkpointing saves the layer input through autograd's hooks; torch_compile would trace them;
    # FSDP and ZeRO-3 checkpoint through their own wrappers (untried)
    reentrant = (training_args.gradient_checkpointing_kwargs or {}).get("use_reentrant", False)
    return (
        torch.cuda.is_available()
        and bool(training_args.gradient_checkpointing)
        and not reentrant
        and not training_args.torch_compile
        and not hardware.sharded_launch()
    )
