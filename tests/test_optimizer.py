"""The recipes' optimizer, PyTorch's fused AdamW, takes the steps of the original tool's bitsandbytes paged 32-bit
AdamW: built by the Trainer from the same recipe, fed the same gradients, the weights stay together."""

import pytest
import torch
from transformers import Trainer

from gemma_sft import config

MISSION = "recipes/gemma3_belle.yaml"


def optimizer_for(optim: str, params):
    _, training_args, *_ = config.parse([MISSION, "--dry_run", "--optim", optim])
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    return optimizer_class([{"params": params, "weight_decay": training_args.weight_decay}], **kwargs)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_adamw_takes_the_paged_32bit_adamw_steps(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 2560, generator=generator), torch.randn(16, 64, generator=generator)]  # LoRA A, B
    ours = [p.clone().to(device).requires_grad_() for p in start]
    theirs = [p.clone().to(device).requires_grad_() for p in start]
    fused, paged = optimizer_for("adamw_torch_fused", ours), optimizer_for("paged_adamw_32bit", theirs)
    assert type(fused).__name__ == "AdamW" and fused.defaults["fused"]
    assert type(paged).__module__.startswith("bitsandbytes")
    steps = 20
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator).to(device) for p in start]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        paged.step()
    for p, q, p0 in zip(ours, theirs, start):
        moved = (q.detach().cpu() - p0).abs().max()
        # fp32 rounding of the weights themselves, a few units in the last place per step: the two optimizers' kernels
        # order their arithmetic differently, and the weights (~1) are far larger than one step (~lr)
        rounding = steps * 4 * torch.finfo(torch.float32).eps * p0.abs().max()
        assert moved > 1e-3 and rounding < 0.02 * moved  # 20 steps of lr 2e-4 moved the weights ...
        assert (p.detach() - q.detach()).abs().max().cpu() < rounding  # ... and both optimizers alike
