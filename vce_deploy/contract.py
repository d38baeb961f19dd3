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


def tensor_shapes(image_size: int, latent_dim: int) -> dict[str, tuple[int, ...]]:
    """Every I/O tensor of both models -> its shape without the batch axis."""
    image, latent = (1, image_size, image_size), (latent_dim,)
    return {"x": image, "q": image, "y": image, "z": latent, "mu": latent, "logvar": latent}


def batched_shapes(model: str, image_size: int, latent_dim: int) -> dict[str, tuple]:
    """`model`'s I/O tensors -> their shapes with the named batch axis first."""
    shapes = tensor_shapes(image_size, latent_dim)
    return {name: (BATCH_AXIS, *shapes[name]) for name in MODEL_IO[model].names}
