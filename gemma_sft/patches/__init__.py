"""Patches: each place where this project replaces part of another library, one module per replacement, all listed
in the registry with a switch, the version they were checked against and whether they are speed or correctness.

    registry          the list, and install/enable/disable
    fused_qlora       4-bit LoRA layers as one autograd function; keep_mlp_outputs, keep_qkv_outputs (speed)
    lora_dropout      the Triton kernels that draw LoRA dropout inside fused_qlora (speed)
    offload_activations  checkpointed layer inputs held in pinned host memory (speed: same arithmetic, less memory)
    output_head       the output head's gradient computed in its forward pass (speed)
    attention         flex_attention kernel options, query/key norms in place, sdpa off cuDNN (speed)
    packing           TRL's packing in one pass over the sample (speed)
    cuda_graphs       the decoder stack's training passes replayed as CUDA graphs (speed)
    packed_block_masks  flex_attention block masks of packed rows kept in place for the graphs
    block_masks       flex_attention block masks built in bands of query rows, without torch.compile (speed: warm-up)
    async_steps       TRL's and the Trainer's per-step figures kept on the GPU until a log reads them (speed)
    fp8_matmul        the frozen weights' products in FP8 inside fused_qlora (speed, off: slower as built)
    fsdp_checkpoints  FSDP checkpoints that hold the adapter and the optimizer state (fix)
"""

from gemma_sft.patches.registry import BY_SWITCH, FIX, PATCHES, SPEED, Patch, applying, disable, enable, install

__all__ = ["BY_SWITCH", "FIX", "PATCHES", "SPEED", "Patch", "applying", "disable", "enable", "install"]
