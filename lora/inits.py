"""How a new adapter's A `[r, in]` and B `[out, r]` start (docs/reference.md#initialisations).

    "kaiming"   A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0     PEFT's default: s·B·A = 0, the adapter starts as a no-op
    "gaussian"  A ~ N(0, 1/r²),             B = 0     also a no-op start
    "pissa"     B A = the top-r singular part of W / s   (Meng et al. 2024)   W <- W - s·B·A
    "olora"     B A = the first r columns / rows of QR(W)  (Büyükakyüz 2024)   W <- W - s·B·A

PiSSA and OLoRA start the adapter from W itself, so they also return the **residual** weight
W - s·B·A that must replace the base weight: the layer's output is unchanged, but the base is no
longer the original one (an adapter trained that way only makes sense on that residual base).
All four follow PEFT 0.21 (`LoraLayer.reset_lora_parameters`, `pissa_init`, `olora_init`), so the
same seed gives the same A.

    >>> A, B = kaiming_init(rank=2, in_features=4, out_features=3)
    >>> A.shape, B.shape, bool((B == 0).all())
    (torch.Size([2, 4]), torch.Size([3, 2]), True)
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn


def kaiming_init(rank: int, in_features: int, out_features: int, dtype: Optional[torch.dtype] = None,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in] Kaiming-uniform, B [out, r] zeros), as nn.Linear(in, r) would start A."""
    lora_A = torch.empty(rank, in_features, dtype=dtype, device=device)  # [r, in]
    lora_B = torch.zeros(out_features, rank, dtype=dtype, device=device)  # [out, r]
    # subtle: A is [r, in], so the fan-in Kaiming sees is `in`, as for nn.Linear(in, r)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    return lora_A, lora_B


def gaussian_init(rank: int, in_features: int, out_features: int, dtype: Optional[torch.dtype] = None,
                  device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in] ~ N(0, 1/r²), B [out, r] zeros)."""
    lora_A = torch.empty(rank, in_features, dtype=dtype, device=device)  # [r, in]
    lora_B = torch.zeros(out_features, rank, dtype=dtype, device=device)  # [out, r]
    nn.init.normal_(lora_A, std=1.0 / rank)
    return lora_A, lora_B


@torch.no_grad()
def pissa_init(weight: torch.Tensor, rank: int, scaling: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], residual W - s·B·A [out, in]) from the SVD of W [out, in] (PiSSA).

    W = U S Vh; with root = sqrt(S_r / s), A = diag(root) Vh_r and B = U_r diag(root), so s·B·A is
    the best rank-r part of W. Computed in float32, returned in W's dtype.
    """
    weight_fp32 = weight.detach().to(torch.float32)  # [out, in]
    U, S, Vh = torch.linalg.svd(weight_fp32, full_matrices=False)  # [out, k], [k], [k, in]
    root = torch.sqrt(S[:rank] / scaling)  # [r]; dividing by s makes s·B·A the top-r part of W
    lora_A = root[:, None] * Vh[:rank]  # diag(sqrt(S_r / s)) Vh_r   [r, in]
    lora_B = U[:, :rank] * root[None, :]  # U_r diag(sqrt(S_r / s))    [out, r]
    return _with_residual(weight, weight_fp32, lora_A, lora_B, scaling)


@torch.no_grad()
def olora_init(weight: torch.Tensor, rank: int, scaling: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], residual W - s·B·A [out, in]) from the QR decomposition of W (OLoRA).

    W = Q R; A = the first r rows of R, B = the first r columns of Q (orthonormal). Computed in
    float32, returned in W's dtype.
    """
    weight_fp32 = weight.detach().to(torch.float32)  # [out, in]
    Q, R = torch.linalg.qr(weight_fp32)  # [out, k], [k, in]
    lora_A, lora_B = R[:rank].contiguous(), Q[:, :rank].contiguous()  # [r, in], [out, r]
    return _with_residual(weight, weight_fp32, lora_A, lora_B, scaling)


def _with_residual(weight, weight_fp32, lora_A, lora_B, scaling):
    residual = weight_fp32 - scaling * lora_B @ lora_A  # [out, in]
    dtype = weight.dtype
    return lora_A.to(dtype), lora_B.to(dtype), residual.to(dtype)
