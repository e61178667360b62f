"""Why the training loop runs its backward pass outside autocast: autocast's weight-cast cache, shown on a CPU.

    python benchmarks/autocast_cache.py inside ckpt     # backward inside the autocast block
    python benchmarks/autocast_cache.py outside ckpt    # backward after it (what training.train() does)

20 Linear(4096, 4096) layers (1.25 GiB of fp32 weights) under bf16 autocast, with ("ckpt") or without ("plain")
activation checkpointing. Prints the peak resident memory above the start, and the gradients' size. Autocast
keeps each half-precision weight copy it makes until its block ends; a backward pass inside the block keeps
all of them to the end of the pass, 2 bytes per trained weight on top of the gradients.
"""

import resource
import sys

import torch
from torch.utils.checkpoint import checkpoint


def main(where: str, checkpointing: bool) -> None:
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(4096, 4096) for _ in range(20))
    x = torch.randn(8, 4096)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for layer in layers:
            x = checkpoint(layer, x, use_reentrant=False) if checkpointing else layer(x)
        loss = x.float().pow(2).mean()
        if where == "inside":
            loss.backward()
    if where == "outside":
        loss.backward()
    gradients = sum(p.grad.numel() * 4 for p in layers.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    mode = "checkpointing" if checkpointing else "plain"
    print(f"backward {where} autocast, {mode}: peak +{(peak - start) / 1024:.0f} MiB, "
          f"gradients {gradients / 2**20:.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "ckpt")
