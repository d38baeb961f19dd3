"""How far an exported precision may stray from eager PyTorch: one table, read by the
exporter's parity report and by `vce verify`, so both agree on what passes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """|onnx - torch| <= atol + rtol * |torch| elementwise, on every output at every batch."""

    atol: float
    rtol: float
    why: str
    must_run: bool = True  # False: a machine without a provider for it reports "not run here"

    def allowed(self, reference: np.ndarray) -> np.ndarray:
        return self.atol + self.rtol * np.abs(reference)


TOLERANCES = {
    # the bar: fp32 kernels differ from PyTorch's only in summation order
    "fp32": Tolerance(1e-4, 0.0, "fp32 against fp32: summation order only"),
    # float16 keeps 11 significant bits (rel. step 2^-11 ~ 5e-4); through ~20 layers that grows
    # to about 1e-2 relative, so anything far beyond that is a conversion bug, not rounding
    "fp16": Tolerance(2e-2, 2e-2, "float16 rounding of weights and activations", must_run=False),
    # bfloat16 keeps 8 significant bits (rel. step 2^-8 ~ 4e-3) in every product; through ~20 layers
    # that grows to a few 1e-2, so 0.1 + 5% flags a broken graph, not rounding. Run by OpenVINO on a
    # CPU with native bf16; elsewhere "not run here"
    "bf16": Tolerance(0.1, 0.05, "bfloat16 arithmetic on the fp32 graph", must_run=False),
    # int8 steps are 1/127 of each tensor's calibrated range, per layer: a loose bar that only
    # catches a broken quantization (swapped scales, a wrong axis, errors of several units); its
    # real cost is the NLL. The trained default model's encoder logvar legitimately moves by up
    # to 0.4 through 17 int8 convs and the row mean, so the absolute bar is 0.5.
    "int8": Tolerance(0.5, 0.25, "int8 QDQ; the real cost is judged by NLL, not here"),
}
