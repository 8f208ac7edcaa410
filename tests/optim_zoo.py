"""Optimizers written for the tests of optimizers named by class (test_optimizers.py): Lion and a
project's own fused Muon + AdamW, as a user would write them."""
import torch

from mutransfer.run.batched_optim import newton_schulz


class Lion(torch.optim.Optimizer):
    """Chen et al. 2023, Algorithm 1: the update is sign(b1 m + (1 - b1) g); decay lr x wd."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-g["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class FusedMuonAdam(torch.optim.Optimizer):
    """A project's own: groups flagged use_muon get orthogonalised momentum (step = the group's lr,
    no shape factor), the others a plain Adam step."""

    def __init__(self, params, lr=0.02, momentum=0.95, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, use_muon=False))
        self.seen_muon = sorted(n for g in self.param_groups if g["use_muon"] for n in g.get("names", []))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                p.mul_(1 - g["lr"] * g["weight_decay"])
                if g["use_muon"]:
                    buf = st.setdefault("buf", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - g["momentum"])
                    p.add_(newton_schulz(buf[None], 5)[0].to(p.dtype), alpha=-g["lr"])
                    continue
                b1, b2 = g["betas"]
                st["t"] = st.get("t", 0) + 1
                m = st.setdefault("m", torch.zeros_like(p))
                v = st.setdefault("v", torch.zeros_like(p))
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** st["t"])).sqrt_().add_(g["eps"])
                p.addcdiv_(m, denom, value=-g["lr"] / (1 - b1 ** st["t"]))


class NotAnOptimizerKind:
    """A class whose family nobody knows: the recipe must say optimizer_kind."""

    def __init__(self, params, lr=1e-3):
        self.param_groups = list(params)
