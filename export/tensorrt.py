"""Step 4: one bundle precision's ONNX graphs -> serialized TensorRT engines, in the bundle.

    python -m export.tensorrt BUNDLE --precision fp32|fp16|int8 --min-batch 1 --opt-batch 64 --max-batch 256

Written to the TensorRT 10/11 Python API and NOT RUN HERE (this machine has no GPU and no
TensorRT). Networks are strongly typed: the precision is the ONNX file's (fp16 weights, int8
QDQ), never a builder flag. One optimization profile over the batch axis of every input, a
workspace limit, and a timing cache saved after each build and reused by the next.

The engines land in BUNDLE/engines/<role>.<precision>.plan, recorded in the manifest with the
TensorRT version, the GPU's compute capability and the batch profile. The bundle is copied to
a staging directory, updated there, verified and renamed into place, so a failed build leaves
it untouched. Without tensorrt or a GPU: a message saying so, exit code 2, bundle untouched.

Building and running are separate: the runner is vce_deploy/backends/tensorrt.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

from vce_deploy.bundle import Bundle, EngineInfo, FileEntry, atomic_directory, file_entry, write_manifest
from vce_deploy.errors import VCEError
from vce_deploy.fsio import atomic_write_bytes

EXIT_UNAVAILABLE = 2  # no tensorrt or no GPU: nothing was attempted
ROLES = ("encoder", "convertor")
DEFAULT_WORKSPACE_MIB = 1024


class Unavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing: the build cannot even start."""


def engine_path(role: str, precision: str) -> str:
    return f"engines/{role}.{precision}.plan"


def default_timing_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "vce_deploy" / "tensorrt.timing-cache"


def _shape(spec, batch: int) -> tuple[int, ...]:
    return tuple(batch if isinstance(d, str) else int(d) for d in spec.shape)


def profile_shapes(entry: FileEntry, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, tuple]:
    """input name -> (min, opt, max) shapes, the batch axis (the one named dimension) varied."""
    return {spec.name: tuple(_shape(spec, b) for b in (min_batch, opt_batch, max_batch)) for spec in entry.inputs}


def trtexec_command(bundle: Path, entry: FileEntry, precision: str, min_batch: int, opt_batch: int,
                    max_batch: int, workspace_mib: int, timing_cache: Path) -> str:
    """The trtexec invocation that builds the same engine (for users who prefer it, or to debug)."""
    shapes = profile_shapes(entry, min_batch, opt_batch, max_batch)
    spec = {kind: ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in shapes.items())
            for i, kind in enumerate(("min", "opt", "max"))}
    return (f"trtexec --onnx={bundle / entry.path} --saveEngine={bundle / engine_path(entry.role, precision)} "
            f"--stronglyTyped --minShapes={spec['min']} --optShapes={spec['opt']} --maxShapes={spec['max']} "
            f"--memPoolSize=workspace:{workspace_mib}M --timingCacheFile={timing_cache}")


def load_tensorrt():
    """(tensorrt module, gpu name, compute capability) or Unavailable naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise Unavailable(f"the tensorrt Python package is not installed ({err}); expected TensorRT 10 or 11 "
                          "(pip install tensorrt) on a machine with a CUDA GPU") from err
    from vce_deploy.backends import cuda

    if cuda.gpu_count() == 0:
        raise Unavailable(f"tensorrt {getattr(trt, '__version__', '?')} is installed, but no CUDA GPU is visible "
                          "(or cuda-python is missing): TensorRT builds engines on the GPU they will run on")
    name, capability = cuda.device_properties(0)
    return trt, name, capability


class EngineBuilder:
    """Parse and describe a network (inputs, outputs, the batch profile), then build and save it."""

    def __init__(self, trt, workspace_mib: int = DEFAULT_WORKSPACE_MIB, verbose: bool = False, log=print):
        self.trt = trt
        self.log = log
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        if self.builder is None:
            raise Unavailable("trt.Builder could not be created: no usable CUDA device for TensorRT")
        self.config = self.builder.create_builder_config()
        self.config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        self.network = None

    def create_network(self, onnx_path: Path, entry: FileEntry, batches: tuple[int, int, int]) -> None:
        trt = self.trt
        # strongly typed: every tensor keeps the ONNX file's type; no FP16/INT8 builder flags
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        self.network = self.builder.create_network(flags)
        parser = trt.OnnxParser(self.network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        self._parser = parser  # the parser owns weights the network refers to until the build
        inputs = [self.network.get_input(i) for i in range(self.network.num_inputs)]
        outputs = [self.network.get_output(i) for i in range(self.network.num_outputs)]
        for kind, tensors in (("input", inputs), ("output", outputs)):
            for t in tensors:
                self.log(f"  {entry.role} {kind} {t.name}: shape {tuple(t.shape)} dtype {t.dtype}")
        want = {spec.name for spec in entry.inputs} | {spec.name for spec in entry.outputs}
        got = {t.name for t in inputs} | {t.name for t in outputs}
        if want != got:
            raise RuntimeError(f"{onnx_path}: expected tensors {sorted(want)} as the manifest says, TensorRT parsed {sorted(got)}")
        profile = self.builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes(entry, *batches).items():
            profile.set_shape(name, low, opt, high)
        self.config.add_optimization_profile(profile)

    def create_engine(self, out: Path, timing_cache: Path) -> None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = self.config.create_timing_cache(blob)
        # a cache from another TensorRT or GPU is refused rather than trusted; then build cold
        if not self.config.set_timing_cache(cache, ignore_mismatch=False):
            self.log(f"  timing cache {timing_cache} does not match this TensorRT/GPU; building without it")
            self.config.set_timing_cache(self.config.create_timing_cache(b""), ignore_mismatch=False)
        serialized = self.builder.build_serialized_network(self.network, self.config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build {out.name} (see its log above)")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(bytes(serialized))
        atomic_write_bytes(timing_cache, bytes(memoryview(self.config.get_timing_cache().serialize())))


def build_engines(bundle_path, precision: str, min_batch: int, opt_batch: int, max_batch: int,
                  workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: Path | None = None,
                  verbose: bool = False, log=print) -> Bundle:
    """Build encoder and convertor engines for `precision` into the bundle. Raises Unavailable
    (bundle untouched) without tensorrt or a GPU."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch profile: expected 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    bundle = Bundle.load(bundle_path, verify=True)
    # int8: the symmetric QDQ form, the only one TensorRT's explicit quantization takes
    entries = {role: bundle.model_entry(role, precision, "onnx", ("tensorrt", "any")) for role in ROLES}
    timing_cache = Path(timing_cache) if timing_cache else default_timing_cache()
    for entry in entries.values():
        log("equivalent: " + trtexec_command(bundle.path, entry, precision, min_batch, opt_batch, max_batch,
                                             workspace_mib, timing_cache))
    trt, gpu_name, capability = load_tensorrt()
    log(f"TensorRT {trt.__version__} on {gpu_name} (compute capability {capability})")
    files = dict(bundle.manifest.files)
    with atomic_directory(bundle.path) as stage:
        shutil.copytree(bundle.path, stage, dirs_exist_ok=True)
        for role, entry in entries.items():
            builder = EngineBuilder(trt, workspace_mib, verbose, log)
            builder.create_network(stage / entry.path, entry, (min_batch, opt_batch, max_batch))
            rel = engine_path(role, precision)
            builder.create_engine(stage / rel, timing_cache)
            info = EngineInfo(tensorrt_version=trt.__version__, compute_capability=capability, min_batch=min_batch,
                              opt_batch=opt_batch, max_batch=max_batch, gpu_name=gpu_name)
            files[rel] = file_entry(stage, rel, role=role, format="tensorrt", precision=precision,
                                    inputs=entry.inputs, outputs=entry.outputs, engine=info)
            log(f"  wrote {rel} ({(stage / rel).stat().st_size} bytes)")
        write_manifest(stage, dataclasses.replace(bundle.manifest, files=files))
        Bundle.load(stage, verify=True)
    return Bundle.load(bundle.path, verify=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.tensorrt",
                                     description="Build TensorRT engines from one precision of a bundle (needs a GPU).")
    parser.add_argument("bundle", help="bundle directory made by `python -m export`")
    parser.add_argument("--precision", required=True, choices=("fp32", "fp16", "int8"))
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--workspace-mib", type=int, default=DEFAULT_WORKSPACE_MIB)
    parser.add_argument("--timing-cache", default=None, help=f"default {default_timing_cache()}")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        build_engines(args.bundle, args.precision, args.min_batch, args.opt_batch, args.max_batch,
                      args.workspace_mib, Path(args.timing_cache) if args.timing_cache else None, args.verbose)
    except Unavailable as err:
        print(f"export.tensorrt: cannot build here: {err}. The bundle was not changed.", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (VCEError, ValueError, RuntimeError) as err:
        print(f"export.tensorrt: error: {err}. The bundle was not changed.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
