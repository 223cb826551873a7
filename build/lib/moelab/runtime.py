"""Where and in what precision a command computes: --device cpu|cuda|mps and --dtype float32|bfloat16.

bfloat16 is autocast for the model's matmuls; the router, the balance losses and the LM loss stay in float32
(MoELayer.route turns autocast off). Nothing in moelab names a device: tensors follow their inputs.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16")


def best_device() -> str:
    """cuda if available, else mps if available, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


@dataclass(frozen=True)
class Runtime:
    device: str = "cpu"      # cpu | cuda | mps
    dtype: str = "float32"   # float32 | bfloat16 (autocast; router and losses stay float32)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"--device={self.device!r} is invalid: allowed one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r} is invalid: allowed one of {', '.join(DTYPES)}")
        available = {"cpu": True, "cuda": torch.cuda.is_available(),
                     "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
        if not available[self.device]:
            raise ValueError(f"--device={self.device} is not available on this machine: allowed "
                             f"{', '.join(d for d in DEVICES if available[d])}")

    def autocast(self) -> AbstractContextManager:
        """The model's forward context: bfloat16 autocast, or nothing for float32."""
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16)


def runtime(device: str | None = None, dtype: str | None = None) -> Runtime:
    """From command-line values (None: the best available device, float32)."""
    return Runtime(device or best_device(), dtype or "float32")
