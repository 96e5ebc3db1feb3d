"""The one numeric setting under which fvkit's results are compared with the reference's.

    from fvkit.models.parity_setting import PARITY_DEVICE, PARITY_DTYPE, PARITY_QUANT

The reference computes on the CPU in float32 without quantization; any other
device, dtype or quantization changes the numbers being compared. The loader
refuses other settings in parity mode and the parity suite refuses them at
start-up, both from these values. This module imports nothing, so the pytest
plugin reads it without loading torch.
"""

from __future__ import annotations

PARITY_DEVICE = "cpu"
PARITY_DTYPE = "fp32"
PARITY_QUANT = "none"
