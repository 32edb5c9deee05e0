"""The precision a run computes in (`--precision`): the dtype of the encoder's autocast and of the operands of the
classifier's products. Parameters, gradients, optimizer state and the classifier's statistics and accumulators
stay fp32 whatever it is.

bf16 keeps fp32's 8 exponent bits, so gradients need no loss scaling; GPUs of compute capability 8.0 and newer
(A100, H100, RTX 30 series and later) run it on their tensor cores. Older GPUs (V100, T4: 7.x) have none for it:
torch and Triton emulate it, slower than fp32 there. fp16, which those GPUs do run on tensor cores, is not
offered: with its 5 exponent bits the encoder's gradients underflow unless the loss is scaled, and a loss scale
here would need every rank to agree on each skipped step while the engines reduce the gradients inside their
optimizers (run/distributed.py); the Triton kernels of the classifier take fp32 and bf16 only.
"""
import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")  # the values of --precision
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BF16_TENSOR_CORES = (8, 0)  # the first CUDA compute capability with bf16 tensor cores (Ampere)


def has_bf16_tensor_cores(device):
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= BF16_TENSOR_CORES


def fastest_precision(device):
    """'bf16' on a GPU with bf16 tensor cores, 'fp32' elsewhere (the CPU, older GPUs)."""
    return "bf16" if has_bf16_tensor_cores(device) else "fp32"


def compute_dtype(precision, device):
    """The torch dtype of `precision` ('bf16' or 'fp32'; None or 'auto': the fastest on `device`)."""
    return DTYPES[fastest_precision(device) if precision in (None, "auto") else precision]


def autocast(precision, device):
    """Autocast to `precision` on `device` (None or 'auto': the fastest there); fp32 is no autocast at all."""
    dtype = compute_dtype(precision, device)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
