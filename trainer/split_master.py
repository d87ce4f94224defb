"""AdamW for bf16 parameters whose fp32 master weight is kept split across the parameter itself
and a 16-bit remainder.

Mixed-precision AdamW usually keeps an fp32 master copy of every bf16 parameter (4 B/param) and
upcasts the bf16 gradient to an fp32 copy before the step (another 4 B/param, alive during the
step). Here the bf16 parameter holds the master's high 16 bits (rounded) and an int16 tensor
`low` its low 16 bits, so the master costs 2 B/param beyond the parameter, and the step reads
the bf16 gradient directly. On CUDA one Triton kernel per tensor does the whole step in one pass:
per element it reads the parameter, low, the gradient and the two fp32 moments (2+2+2+8 bytes)
and writes the parameter, low and the moments (2+2+8 bytes).

Bit layout (exact, lossless). M is the fp32 master's bits as uint32, hi = M >> 16, lo = M & 0xFFFF:
    parameter bits P = hi + (1 if lo >= 0x8000 else 0)   (mod 2**16)
    low              = lo, its 16 bits reinterpreted as int16
and back: hi = P - (1 if lo >= 0x8000 else 0), M = (hi << 16) | lo. A master made from a bf16
parameter has low = 0 and equals the parameter. The parameter is the master rounded to nearest
with ties away from zero (the carry into hi increments the magnitude, whatever the sign); torch's
`master.to(torch.bfloat16)` breaks ties to even, so the two differ only where lo == 0x8000
exactly, by one bf16 step. One exception keeps NaN visible: a NaN master is stored as the quiet
NaN 0x7FC00000 (payload and sign dropped), since NaNs with hi 0x7FFF or 0xFFFF and lo >= 0x8000,
CUDA's canonical NaN 0x7FFFFFFF among them, would carry into a parameter of -0.0 or +0.0 and hide
a diverged master from the forward pass. Every other bit pattern round-trips exactly.

The arithmetic is torch.optim.AdamW's, in fp32 per element, with the order of operations and
host-computed scalars of torch's _single_tensor_adam (decoupled weight decay, no amsgrad, no
maximize). Here every operation rounds once and correctly, in the kernel and in the torch ops that
run elsewhere alike, so the two give the same bits. torch's own CPU step differs by an ulp here
and there: its lerp and addcmul round a fused multiply-add and its vectorized sqrt is not always
correctly rounded. torch's fused CUDA AdamW differs in its own ways (it mixes the fp64 betas into
its arithmetic), so no fp32 kernel matches it bit for bit: most masters end a few ulps apart (the
tests see up to 7.5e-8 at |master| <= 0.25 after eight steps), as rounding differences persist.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.lean_ops import triton_module

_TIE = 0x8000
_INF = 0x7F800000  # fp32 +inf's bits: above it (sign masked off) lie the NaNs
_NAN = 0x7FC00000  # the quiet NaN a NaN master is stored as (module docstring)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel), else t itself: the step is
    elementwise, so each rank steps its own shard with state shaped like that shard."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _to_int16(v: torch.Tensor) -> torch.Tensor:
    """16-bit values held in int32 (0..0xFFFF) as int16 with the same bits, without relying on
    the cast's wrap-around."""
    return torch.where(v >= _TIE, v - 0x10000, v).to(torch.int16)


def _join_bits(param_bits: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The master's 32 bits as int32, from the parameter's 16 bits and low (both int16)."""
    lo = low.to(torch.int32) & 0xFFFF
    hi = ((param_bits.to(torch.int32) & 0xFFFF) - (lo >= _TIE).to(torch.int32)) & 0xFFFF
    return (hi << 16) | lo


def _split_bits(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parameter bits, low), both int16, from the master's bits as int32 (NaN made _NAN first)."""
    bits = torch.where((bits & 0x7FFFFFFF) > _INF, _NAN, bits)
    lo = bits & 0xFFFF
    hi = ((bits >> 16) + (lo >= _TIE).to(torch.int32)) & 0xFFFF
    return _to_int16(hi), _to_int16(lo)


def split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 parameter, int16 low) holding the fp32 `master` exactly (module docstring's layout)."""
    param_bits, low = _split_bits(master.float().view(torch.int32))
    return param_bits.view(torch.bfloat16), low


def join(param: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp32 master held by a bf16 parameter and its int16 low (inverse of split)."""
    return _join_bits(param.view(torch.int16), low).view(torch.float32)


class _Scalars(NamedTuple):
    """The step's scalars, computed on the host in fp64 as torch does and rounded to fp32 where
    they meet the tensors (torch's CPU ops and the kernel's fp32 arguments alike)."""

    decay: float  # 1 - lr * weight_decay
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    step_size: float  # lr / (1 - beta1**step)
    bias_correction2_sqrt: float  # (1 - beta2**step) ** 0.5


def _scalars(lr, beta1, beta2, eps, weight_decay, step) -> _Scalars:
    lr = float(lr)
    return _Scalars(decay=1 - lr * weight_decay, one_minus_beta1=1 - beta1, beta2=beta2,
                    one_minus_beta2=1 - beta2, eps=eps, step_size=lr / (1 - beta1**step),
                    bias_correction2_sqrt=(1 - beta2**step) ** 0.5)


def _sqrt_rn(v: torch.Tensor) -> torch.Tensor:
    """sqrt rounded correctly, as the kernel's sqrt_rn and CUDA's sqrt: torch's vectorized CPU
    sqrt is 1 ulp off for about 1 element in 150. The fp64 root (within an ulp of fp64) rounded
    to fp32 is exact, since the root of an fp32 number lies at least 2**-51 (relative) from any
    fp32 rounding midpoint."""
    return v.double().sqrt().float() if v.device.type == "cpu" else v.sqrt()


# Elements the torch ops step at a time: TORCH_CHUNK (their fp32 and int32 temporaries some 40
# KiB), or 1/CHUNKS_PER_TENSOR of a larger tensor (some 0.15 B per element beside the 14 of its
# state), so the trainer's memory on CPU is what the estimate counts for the GPU, where the
# kernel makes no temporaries, and a large tensor is not thousands of chunks (each a few dozen
# small ops: 1.5 s for 4M elements in 1024-element chunks, 0.16 s in 256 chunks, on 2 cores).
TORCH_CHUNK = 1024
CHUNKS_PER_TENSOR = 256


def _step_torch(param_bits, low, grad, exp_avg, exp_avg_sq, s: _Scalars) -> None:
    """The step with torch ops, a chunk of elements at a time (TORCH_CHUNK, CHUNKS_PER_TENSOR)."""
    flat = [t.reshape(-1) for t in (param_bits, low, grad, exp_avg, exp_avg_sq)]
    if not all(t.is_contiguous() for t in (param_bits, low, exp_avg, exp_avg_sq)):
        raise ValueError("split AdamW: the parameter, low and moments must be contiguous")
    # a device tensor, not a Python float: CUDA divides by a host scalar as a product with its reciprocal
    bias_correction2_sqrt = torch.tensor(s.bias_correction2_sqrt, dtype=torch.float32, device=exp_avg_sq.device)
    n = flat[0].numel()
    chunk = max(TORCH_CHUNK, n // CHUNKS_PER_TENSOR)
    for start in range(0, n, chunk):
        _step_torch_chunk(*(t[start : start + chunk] for t in flat), s, bias_correction2_sqrt)


def _step_torch_chunk(param_bits, low, grad, exp_avg, exp_avg_sq, s: _Scalars, bias_correction2_sqrt) -> None:
    """One chunk, one rounding per op (each line as the kernel's, trainer/split_master_kernel.py)."""
    g = grad.float()
    master = _join_bits(param_bits, low).view(torch.float32)
    master = master * s.decay
    exp_avg.add_((g - exp_avg) * s.one_minus_beta1)
    exp_avg_sq.mul_(s.beta2).add_(g * s.one_minus_beta2 * g)
    denom = _sqrt_rn(exp_avg_sq) / bias_correction2_sqrt + s.eps
    master = master - exp_avg * s.step_size / denom
    new_bits, new_low = _split_bits(master.view(torch.int32))
    param_bits.copy_(new_bits)
    low.copy_(new_low)


def _kernel_step(kernel: bool | None, *tensors: torch.Tensor):
    """trainer/split_master_kernel.py's step where `kernel` asks for it (True: any device; CPU
    tensors under TRITON_INTERPRET=1) or, with None, for contiguous CUDA tensors where triton
    imports; else None."""
    if kernel is False or (kernel is None and not all(t.is_cuda and t.is_contiguous() for t in tensors)):
        return None
    if kernel:
        from trainer import split_master_kernel

        return split_master_kernel.step
    module = triton_module("split_master_kernel")
    return module.step if module else None


def split_adamw_(param_bits, low, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
                 kernel: bool | None = None) -> None:
    """One AdamW step, in place, of the fp32 master held by `param_bits` (the bf16 parameter or
    its int16 view) and `low`, with `grad` (bf16 or fp32, same shape) and the fp32 moments;
    `step` counts this step (1 for the first). `kernel`: None takes the Triton kernel for
    contiguous CUDA tensors and torch ops otherwise (both compute the same bits); True takes
    the kernel for any device (CPU tensors run under TRITON_INTERPRET=1, as the tests do)."""
    param_bits = param_bits.view(torch.int16)
    s = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    stepper = _kernel_step(kernel, param_bits, low, exp_avg, exp_avg_sq) or _step_torch
    stepper(param_bits, low, grad, exp_avg, exp_avg_sq, s)


class SplitMasterAdamW(torch.optim.Optimizer):
    """AdamW over bf16 parameters with split fp32 masters (module docstring). State per
    parameter, made at its first step: "low" (int16), "exp_avg" and "exp_avg_sq" (fp32), shaped
    like the parameter's local shard, and "step" (int)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        wrong = [p for p in self.param_groups[-1]["params"] if p.dtype != torch.bfloat16]
        if wrong:
            self.param_groups.pop()
            raise ValueError(f"SplitMasterAdamW steps bfloat16 parameters only (they hold their master's high "
                             f"half); got a {wrong[0].dtype} parameter of shape {tuple(wrong[0].shape)}")

    @staticmethod
    def _fresh_state(local: torch.Tensor) -> dict:
        def zeros(dtype):
            return torch.zeros_like(local, dtype=dtype, memory_format=torch.contiguous_format)

        return {"step": 0, "low": zeros(torch.int16), "exp_avg": zeros(torch.float32),
                "exp_avg_sq": zeros(torch.float32)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                local, state = _local(p), self.state[p]
                if not state:
                    state.update(self._fresh_state(local))
                state["step"] += 1
                split_adamw_(local, state["low"], _local(p.grad), state["exp_avg"], state["exp_avg_sq"],
                             lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], step=state["step"])
        return loss

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master of p (of its local shard for a DTensor); p as fp32 before its first step."""
        local, state = _local(p), self.state.get(p)
        return join(local, state["low"]) if state else local.float()

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that each state tensor keeps its own dtype: torch casts floating
        state to the parameter's dtype, which would round the fp32 moments to bf16 and turn low
        into bf16 values."""
        saved = state_dict["state"]
        tensors = {i: {k: v for k, v in s.items() if torch.is_tensor(v)} for i, s in saved.items()}
        rest = {i: {k: v for k, v in s.items() if not torch.is_tensor(v)} for i, s in saved.items()}
        super().load_state_dict({**state_dict, "state": rest})
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key, value in tensors.get(i, {}).items():
                self.state[p][key] = value.to(device=_local(p).device)
