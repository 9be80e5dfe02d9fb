"""What a device can do, by its name: dense bf16 peak FLOP/s (the denominator of MFU)."""

from __future__ import annotations

import re

# Dense (no sparsity) bf16 tensor-core peak FLOP/s with FP32 accumulate, by device name (vendor datasheets and
# architecture whitepapers). GeForce parts run FP32 accumulate at half their FP16-accumulate rate: the RTX 3090's
# 71 TFLOPS is its BF16/FP32-accumulate figure (GA102 whitepaper, App. A: 142 is FP16-accumulate), the 4090's 165.
PEAK_BF16_FLOPS = {
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores; V100 has no bf16
    "T4": 65e12,
}


def peak_flops_for(name: str) -> float | None:
    """The table's entry whose name appears in ``name`` as a whole word ("L4" is not inside "L40S");
    entries are ordered more specific first."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return flops
    return None
