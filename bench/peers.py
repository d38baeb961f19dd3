"""The contenders: every runtime backend through `Converter.load` (bare engine call and
`Converter.convert` end to end) and the honest PyTorch peers (engine call only), each in its
strongest known form. A peer that cannot run here is kept with the reason."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vce_deploy import Converter, VCEError
from vce_deploy.backends.auto import nll_cost
from vce_deploy.backends.base import physical_cores
from vce_deploy.bundle import Bundle

SEED = 0


@dataclass
class Peer:
    id: str
    family: str  # "torch" (what a PyTorch user runs) or "runtime" (a vce_deploy backend)
    precision: str
    engine: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None  # (z, q) -> y on a ready batch
    convert: Callable[[Any, int], np.ndarray] | None = None  # (image, n) -> (1, n, 28, 28), end to end
    detail: str = ""
    nll_cost: float | None = None  # nats against fp32, from the bundle's manifest
    warm: Callable[[np.ndarray, np.ndarray], None] | None = None  # first calls before timing (compile)
    reason: str | None = None  # why it does not run here
    chosen: str = ""  # a runtime peer's backend and precision, in a few words


def runtime_peer(peer_id: str, backend: str, precision: str, consumer: str = "cpu", options=None) -> Callable:
    def build(bundle: Path, threads: int) -> Peer:
        conv = Converter.load(bundle, backend=backend, precision=precision, threads=threads, max_batch=256,
                              backend_options=options)
        engine = conv.backend

        def bare(z, q):
            return engine.run("convertor", {"z": z, "q": q})["y"]

        def end_to_end(image, n):
            return conv.convert(image, n=n, seed=SEED)

        cost = nll_cost(conv.bundle, conv.precision, consumer)
        info = conv.backend_info
        return Peer(peer_id, "runtime", conv.precision, bare, end_to_end, f"{info}", cost,
                    chosen=f"{info.name} {info.precision} on {info.device}")

    return build


def ort_tensorrt_form_peer(bundle: Path, threads: int) -> Peer:
    """ONNX Runtime on the symmetric int8 file made for TensorRT, set up as the runtime sets up
    its sessions: what the CPU would get from the TensorRT form."""
    import onnxruntime as ort

    loaded = Bundle.load(bundle)
    entry = loaded.model_entry("convertor", "int8", "onnx", ("tensorrt",))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(loaded.read_verified(entry), options, providers=["CPUExecutionProvider"])
    return Peer("ort-int8-tensorrt-form", "runtime", "int8", lambda z, q: session.run(["y"], {"z": z, "q": q})[0],
                detail=f"onnxruntime {ort.__version__} InferenceSession on {entry.path} (consumer {entry.consumer})",
                nll_cost=nll_cost(loaded, "int8", "tensorrt"))


def _convertor(bundle: Path):
    from vce_deploy.checkpoint import load_model

    checkpoint = Bundle.load(bundle).checkpoint
    if checkpoint is None:
        raise VCEError(f"{bundle} has no checkpoint.safetensors: the PyTorch peers run the bundle's checkpoint")
    return load_model(checkpoint)[0].convertor.eval()


def torch_peer(peer_id: str, channels_last: bool, compiled: bool, bf16: bool, trace_under_autocast: bool = False):
    """PyTorch as its users run it: eager or torch.compile (inductor, one graph per batch size),
    contiguous or channels_last, fp32 or bf16 autocast. A compiled bf16 module is either first
    traced in fp32 and then called under autocast, or traced under autocast: the two forms differ
    by 3x on an AMX Xeon, so both are contenders."""

    def build(bundle: Path, threads: int) -> Peer:
        import torch

        fmt = torch.channels_last if channels_last else torch.contiguous_format
        module = copy.deepcopy(_convertor(bundle)).to(memory_format=fmt)
        if compiled:
            for knob in ("cache_size_limit", "recompile_limit"):  # several compiled peers share one forward
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 64)
            module = torch.compile(module, dynamic=False)

        def call(z, q, autocast: bool):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = module(torch.from_numpy(z), torch.from_numpy(q).contiguous(memory_format=fmt))
            return y.float().contiguous().numpy()

        def warm(z, q):
            if compiled and bf16 and not trace_under_autocast:
                call(z, q, autocast=False)  # the first trace in fp32

        form = ("torch.compile (inductor, dynamic=False) of " if compiled else "eager ") + \
            ("channels_last" if channels_last else "contiguous") + " convertor" + \
            (", bf16 autocast" + (" (traced under autocast)" if trace_under_autocast else
                                  " (traced in fp32 first)" if compiled else "") if bf16 else ", fp32")
        return Peer(peer_id, "torch", "bf16" if bf16 else "fp32", lambda z, q: call(z, q, bf16),
                    detail=f"{form}, torch {torch.__version__}, {torch.get_num_threads()} threads", warm=warm)

    return build


def pt2e_int8_peer(bundle: Path, threads: int) -> Peer:
    """int8 as a PyTorch user gets it on a CPU: PT2E static quantisation (torch.export, then
    torchao's prepare_pt2e / convert_pt2e with X86InductorQuantizer's default config, calibrated
    on the bundle's golden inputs) and torch.compile with inductor freezing, which lowers the
    quantised convs to oneDNN int8 kernels. One export per batch size (static shapes), built at
    the first call of that size (the warm-up, never timed)."""
    import torch
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from vce_deploy.golden import load_golden

    golden = load_golden(Bundle.load(bundle))
    if golden is None:
        raise VCEError(f"{bundle} has no golden inputs: PT2E int8 is calibrated on them")
    calibration = (torch.from_numpy(golden.arrays["z"]), torch.from_numpy(golden.arrays["q"]))
    module = copy.deepcopy(_convertor(bundle))
    built: dict[int, Callable] = {}

    def build(batch: int) -> Callable:
        index = torch.arange(batch) % calibration[0].shape[0]
        example = (calibration[0][index], calibration[1][index])
        with torch.no_grad():
            exported = torch.export.export(module, example).module()
            quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(exported, quantizer)
            prepared(*example)  # calibration: observers see the golden rows
            return torch.compile(convert_pt2e(prepared), dynamic=False)

    def call(z, q):
        batch = z.shape[0]
        first = batch not in built
        if first:
            built[batch] = build(batch)
        # freezing (for this compile only) folds the weights' quantisation: oneDNN int8 convs
        with torch.no_grad(), inductor_config.patch(freezing=True) if first else contextlib.nullcontext():
            return built[batch](torch.from_numpy(z), torch.from_numpy(q)).float().contiguous().numpy()

    import torchao

    return Peer("torch-pt2e-int8", "torch", "int8", call, warm=call,
                detail=f"PT2E int8 (X86InductorQuantizer default static config, torchao {torchao.__version__}, "
                       f"calibrated on {golden.count} golden rows) + torch.compile (inductor, freezing), torch "
                       f"{torch.__version__}, {torch.get_num_threads()} threads")


# id -> builder, in the table's order
PEERS: dict[str, Callable[[Path, int], Peer]] = {
    "auto": runtime_peer("auto", "auto", "auto"),
    "openvino-bf16": runtime_peer("openvino-bf16", "openvino", "bf16"),
    "openvino-int8": runtime_peer("openvino-int8", "openvino", "int8"),
    "openvino-fp32": runtime_peer("openvino-fp32", "openvino", "fp32"),
    # OpenVINO's single-hint forms, beside the default (LATENCY below 16 rows, THROUGHPUT above)
    "openvino-bf16-latency": runtime_peer("openvino-bf16-latency", "openvino", "bf16",
                                          options={"performance_hint": "LATENCY"}),
    "openvino-bf16-throughput": runtime_peer("openvino-bf16-throughput", "openvino", "bf16",
                                             options={"performance_hint": "THROUGHPUT"}),
    "ort-fp32": runtime_peer("ort-fp32", "onnxruntime", "fp32"),
    "ort-int8-cpu-form": runtime_peer("ort-int8-cpu-form", "onnxruntime", "int8"),
    "ort-int8-tensorrt-form": ort_tensorrt_form_peer,
    "torch-eager": torch_peer("torch-eager", False, False, False),
    "torch-channels-last": torch_peer("torch-channels-last", True, False, False),
    "torch-compile": torch_peer("torch-compile", True, True, False),
    "torch-eager-bf16": torch_peer("torch-eager-bf16", False, False, True),
    "torch-channels-last-bf16": torch_peer("torch-channels-last-bf16", True, False, True),
    "torch-compile-bf16": torch_peer("torch-compile-bf16", True, True, True),
    "torch-compile-bf16-autocast-trace": torch_peer("torch-compile-bf16-autocast-trace", True, True, True, True),
    "torch-pt2e-int8": pt2e_int8_peer,
}
BASELINE = "torch-eager"  # outputs are compared against it
REFERENCE_RUNTIME = "ort-fp32"  # the targets' "ONNX Runtime fp32"


def build_peers(ids, bundle: Path, threads: int | None) -> list[Peer]:
    threads = threads or physical_cores()
    peers = []
    for peer_id in ids:
        try:
            peers.append(PEERS[peer_id](bundle, threads))
        except (VCEError, ImportError, RuntimeError, OSError) as err:
            peers.append(Peer(peer_id, "torch" if peer_id.startswith("torch") else "runtime", "-",
                              reason=" ".join(f"{type(err).__name__}: {err}".split())[:300]))
    return peers
