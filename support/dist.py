"""support/dist.py -- the few lines torchrun needs: FSDP2 over the decoder layers, rank-0 writes, mean metrics.

Under torchrun (WORLD_SIZE > 1) sft.py and grpo.py shard the model with FSDP2 across the processes: each holds a
shard of the float32 weights and AdamW moments, computes in bf16 and reduces gradients in float32. GRPO keeps a full
bf16 copy of the policy for the rollout (`copy_weights` refreshes it after each update, one tensor at a time). A
plain `python sft.py` never enters this module beyond `dist_init() -> (0, 1)`.
"""
import functools
import os

import torch

from model import token_logprobs


# ------------------------------------------------------------------------------------------------ more than one GPU
# Under torchrun (WORLD_SIZE > 1) sft.py and grpo.py shard the model with FSDP2 across the processes; a plain
# `python sft.py` never enters this section.
def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def dist_init():
    """-> (rank, world size). Under torchrun: join the process group (NCCL on GPUs, gloo on CPU), one GPU a
    process; otherwise (0, 1) and nothing happens."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank(), world


def shard(model):
    """FSDP2 over each decoder layer and vision block, then the root (embeddings, norms, output layer, projector).
    On GPUs the weights stay float32 (sharded, with the optimizer's moments: plain fp32 AdamW fits on 8 GPUs) and
    compute in bf16, gradients reduced in float32. The training forward (token_logprobs) becomes a forward method
    of the root, so FSDP gathers the root's weights around it, as around model(...)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)) \
        if torch.cuda.is_available() else {}
    for block in [*model.model.language_model.layers, *model.model.visual.blocks]:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    model.fsdp_logprobs = functools.partial(token_logprobs, model, _gathered=True)
    register_fsdp_forward_method(model, "fsdp_logprobs")
    return model


@torch.no_grad()
def copy_weights(src, dst):
    """dst's weights := src's, one tensor at a time (a sharded one gathered from every rank): GRPO's rollout runs on
    a full bf16 copy of the policy, refreshed after each update."""
    target = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        target[name].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


def all_mean(metrics, sums=()):
    """Metrics averaged over the ranks (the keys in `sums` added up), before rank 0 logs them."""
    if not torch.distributed.is_initialized():
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    world = torch.distributed.get_world_size()
    return dict(metrics, **{k: v if k in sums else v / world for k, v in zip(keys, t.tolist())})


