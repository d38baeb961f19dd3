"""python -m bench.openvino_graph [--bundle B] [--batch 64] [--threads 1]: what OpenVINO's CPU
plugin runs for each convertor form (execution graph: layer type, kernel, runtime precision) and
where the time goes (PERF_COUNT per-layer times), e.g. whether an AMX int8 convolution is chosen
(docs/cpu_inference.md, "int8 on an AMX Xeon")."""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np

from vce_deploy.bundle import Bundle

FORMS = (("bf16", "convertor.onnx", "bf16"), ("int8 CPU form", "convertor.int8.cpu.onnx", "f32"),
         ("int8 TensorRT form", "convertor.int8.onnx", "f32"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openvino_graph", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import openvino as ov

    bundle, core = Bundle.load(args.bundle), ov.Core()
    rng = np.random.default_rng(0)
    feeds = {"z": rng.standard_normal((args.batch, bundle.manifest.latent_dim), dtype=np.float32),
             "q": (rng.random((args.batch, 1, 28, 28)) > 0.8).astype(np.float32)}
    for label, path, hint in FORMS:
        model = core.read_model(str(bundle.path / path))
        model.reshape({"z": list(feeds["z"].shape), "q": list(feeds["q"].shape)})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERF_COUNT": True,
                                                     "INFERENCE_NUM_THREADS": args.threads})
        kernels = collections.Counter()
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == "Convolution":
                kernels[f"{info['primitiveType'].astype(str)} ({info['runtimePrecision'].astype(str)})"] += 1
        request = compiled.create_infer_request()
        for _ in range(3):
            request.infer(feeds)
        start = time.perf_counter()
        for _ in range(10):
            request.infer(feeds)
        per_call = (time.perf_counter() - start) / 10 * 1e3
        spent = collections.Counter()
        for layer in request.get_profiling_info():
            spent[f"{layer.node_type} {layer.exec_type}"] += layer.real_time.total_seconds() * 1e3
        print(f"{label} ({path}): {per_call:.1f} ms per call at batch {args.batch}, {args.threads} threads; "
              f"convolutions: {dict(kernels)}; ms by layer kind: "
              f"{ {k: round(v, 2) for k, v in spent.most_common(5)} }")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
