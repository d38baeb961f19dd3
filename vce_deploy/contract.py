"""The model's I/O contract, stated once: every other part of the project imports it.

The VCE ships as two graphs (docs/design.md, "The contract"): the encoder maps a target and
its condition to the posterior over the latent, the convertor maps a latent and a condition
to Bernoulli means. Batch is the only dynamic axis; every input and output is float32 at the
graph boundary, whatever precision runs inside (fp16 and int8 graphs keep float32 I/O).
"""
from __future__ import annotations

from dataclasses import dataclass

BATCH_AXIS = "batch"  # the name of the one dynamic axis in every exported graph
IO_DTYPE = "float32"


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return self.inputs + self.outputs


# model name -> its inputs and outputs, in the order the graphs declare them
MODEL_IO: dict[str, ModelIO] = {
    "encoder": ModelIO(inputs=("x", "q"), outputs=("mu", "logvar")),
    "convertor": ModelIO(inputs=("z", "q"), outputs=("y",)),
}
MODELS: tuple[str, ...] = tuple(MODEL_IO)

# precisions of the bundle's graph files
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")

# precisions a backend can be asked to run: the file precisions, plus bf16, which is not a file
# but the fp32 graph computed in bfloat16 by an engine that supports it (OpenVINO's inference
# precision hint), on CPUs with native bf16 units (docs/cpu_inference.md)
RUN_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")
FILE_PRECISION: dict[str, str] = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp16", "int8": "int8"}

# who a graph file is for. int8 ships in two forms: symmetric QDQ (zero points 0), the only one
# TensorRT's explicit quantization takes, and uint8 asymmetric activations with per-channel int8
# weights, the form ONNX Runtime's and OpenVINO's x86 int8 kernels run fast. "any": every backend.
CONSUMERS: tuple[str, ...] = ("any", "tensorrt", "cpu")
TENSORRT_FORMS = ("tensorrt", "any")  # the ONNX files TensorRT builds engines from, in order


def tensor_shapes(image_size: int, latent_dim: int) -> dict[str, tuple[int, ...]]:
    """Every I/O tensor of both models -> its shape without the batch axis."""
    image, latent = (1, image_size, image_size), (latent_dim,)
    return {"x": image, "q": image, "y": image, "z": latent, "mu": latent, "logvar": latent}


def batched_shapes(model: str, image_size: int, latent_dim: int) -> dict[str, tuple]:
    """`model`'s I/O tensors -> their shapes with the named batch axis first."""
    shapes = tensor_shapes(image_size, latent_dim)
    return {name: (BATCH_AXIS, *shapes[name]) for name in MODEL_IO[model].names}
