"""support/optim.py -- AdamW that trains bf16 weights on one GPU, and a step that never writes a NaN.

The paper trains the whole 7B at lr 1e-6 (RL) and 1e-5 (SFT). On bf16 weights, round-to-nearest drops most of such
updates, and fp32 master weights do not fit on one 80 GB GPU next to the moments; so `AdamW` computes each step in
float32 and writes weights and moments back with stochastic rounding (unbiased, no extra memory). `finite_step`
clips, then steps only when the gradient norm is finite: a non-finite update is skipped (and counted by the caller),
never applied, never checkpointed.
"""
import math

import torch


def finite_step(opt, params, grad_clip):
    """Clip the gradient and step, unless it is not finite: then the step is skipped (the caller counts it), so a
    NaN never reaches the weights or a checkpoint. -> (grad norm, whether the optimizer stepped)."""
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)   # sharded: one global norm
    if math.isfinite(gnorm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm, math.isfinite(gnorm)


class AdamW(torch.optim.Optimizer):
    """AdamW whose updates survive bf16 weights: each step is computed in float32 and written back with stochastic
    rounding (on float32 weights it is plain AdamW). Why: at lr 1e-5 an Adam step moves a weight by ~1e-5, while half
    a bf16 ulp of a typical 7B weight (0.02) is 6e-5, so round-to-nearest drops most updates and torch's AdamW on
    bf16 weights barely trains. fp32 master weights fix that too, but their 4 bytes per parameter (30 GB for the 7B
    language model) do not fit on one 80 GB GPU next to the moments; stochastic rounding costs no memory and is
    unbiased. The moments are kept in the weights' dtype, rounded the same way."""
    CHUNK = 2**24   # elements per slice: the 7B's 545M-entry embedding would need ~15 GB of float32 temporaries

    def __init__(self, params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _write(dst, src):
        if dst.dtype == torch.bfloat16:   # add uniform noise below the 16 bits bf16 drops, then drop them
            bits = src.view(torch.int32) + torch.randint_like(src, 0, 1 << 16, dtype=torch.int32)
            src = (bits & -65536).view(torch.float32)
        dst.copy_(src)

    @torch.no_grad()
    def step(self, closure=None):   # closure: the Optimizer interface (torch's state-dict tools pass None)
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                # elementwise, so a sharded (FSDP) parameter is updated shard by shard, each on its own rank
                local = lambda x: x.to_local() if hasattr(x, "to_local") else x
                for i in range(0, local(p).numel(), self.CHUNK):   # float32 temporaries of one slice at a time
                    view = lambda x: local(x).view(-1)[i:i + self.CHUNK]
                    g = view(p.grad).float()
                    m = view(state["exp_avg"]).float().lerp_(g, 1 - b1)
                    v = view(state["exp_avg_sq"]).float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                    new = view(p).float().mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                    for dst, src in ((p, new), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
                        self._write(view(dst), src)


