"""python -m bench.openvino_graph [--bundle B] [--batch 64] [--threads 1] [--rounds 5] [--nncf]: what OpenVINO's CPU
plugin runs for each convertor form (execution graph: layer type, kernel, runtime precision) and
where the time goes (PERF_COUNT per-layer times), e.g. whether an AMX int8 convolution is chosen
(docs/cpu_inference.md, "int8 on an AMX Xeon").

--nncf adds OpenVINO's own int8 (nncf.quantize of the fp32 convertor, presets PERFORMANCE and
MIXED), calibrated on the bundle's golden q with fresh N(0, I) latents: an experiment on speed
and placement only (no NLL cost is measured for these forms, so no bundle holds them)."""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np

from vce_deploy.bundle import Bundle

FORMS = (("bf16", "convertor.onnx", "bf16"), ("int8 CPU form", "convertor.int8.cpu.onnx", "f32"),
         ("int8 TensorRT form", "convertor.int8.onnx", "f32"))


def nncf_forms(model, bundle: Bundle, rng: np.random.Generator) -> list:
    """[(label, int8 model, "f32")] from nncf.quantize with each preset, 40 calibration batches of 8."""
    import nncf

    from vce_deploy.golden_file import load_golden

    q = load_golden(bundle).arrays["q"]
    batches = [{"z": rng.standard_normal((8, bundle.manifest.latent_dim), dtype=np.float32),
                "q": q[rng.integers(0, len(q), 8)]} for _ in range(40)]
    return [(f"int8 NNCF {preset} (convertor.onnx)",
             nncf.quantize(model, nncf.Dataset(batches), preset=getattr(nncf.QuantizationPreset, preset),
                           subset_size=len(batches)), "f32") for preset in ("PERFORMANCE", "MIXED")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openvino_graph", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, the forms interleaved in each")
    parser.add_argument("--nncf", action="store_true", help="also NNCF's int8 of the fp32 convertor")
    args = parser.parse_args(argv)
    import openvino as ov

    bundle, core = Bundle.load(args.bundle), ov.Core()
    rng = np.random.default_rng(0)
    feeds = {"z": rng.standard_normal((args.batch, bundle.manifest.latent_dim), dtype=np.float32),
             "q": (rng.random((args.batch, 1, 28, 28)) > 0.8).astype(np.float32)}
    forms = [(f"{label} ({path})", core.read_model(str(bundle.path / path)), hint) for label, path, hint in FORMS]
    if args.nncf:
        forms += nncf_forms(core.read_model(str(bundle.path / "convertor.onnx")), bundle, rng)
    requests = {}
    for label, model, hint in forms:
        model.reshape({"z": list(feeds["z"].shape), "q": list(feeds["q"].shape)})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERF_COUNT": True,
                                                     "INFERENCE_NUM_THREADS": args.threads})
        kernels = collections.Counter()
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == "Convolution":
                kernels[f"{info['primitiveType'].astype(str)} ({info['runtimePrecision'].astype(str)})"] += 1
        requests[label] = compiled.create_infer_request()
        for _ in range(3):
            requests[label].infer(feeds)
        print(f"{label}: convolutions: {dict(kernels)}")
    per_call = {label: [] for label in requests}  # ms, one median of 10 calls per round, forms interleaved
    for _ in range(args.rounds):
        for label, request in requests.items():
            times = []
            for _ in range(10):
                start = time.perf_counter()
                request.infer(feeds)
                times.append(time.perf_counter() - start)
            per_call[label].append(float(np.median(times)) * 1e3)
    for label, request in requests.items():
        spent = collections.Counter()
        for layer in request.get_profiling_info():  # the last call's per-layer times
            spent[f"{layer.node_type} {layer.exec_type}"] += layer.real_time.total_seconds() * 1e3
        ms = per_call[label]
        print(f"{label}: {np.median(ms):.1f} ms per call (rounds {min(ms):.1f}-{max(ms):.1f}) at batch {args.batch}, "
              f"{args.threads} threads = {args.batch / np.median(ms) * 1e3:.0f} images/s; ms by layer kind: "
              f"{ {k: round(v, 2) for k, v in spent.most_common(5)} }")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
