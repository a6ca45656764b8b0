"""SHA-256 fingerprints of named tensors.

A mask only makes sense on the exact weights it was learned on, so task files record the backbone's
fingerprint and refuse other weights. The same function checksums a task file's own tensors, which
catches corruption that the safetensors container cannot see (flipped bits in the data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of a tensor in C order (every dtype, bfloat16 included), without a copy
    when the tensor is already a contiguous CPU tensor: the backbone is hashed on every load."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def fingerprint(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted name order, as 'sha256:<hex>'."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        header = f"{name}\0{tensor.dtype!s}\0{tuple(tensor.shape)}\0{tensor.numel()}\0"
        digest.update(header.encode())
        digest.update(tensor_bytes(tensor))
    return "sha256:" + digest.hexdigest()
