"""`vce build`: one bundle precision's ONNX graphs -> TensorRT engines, on the device that runs them.

    vce build BUNDLE --precision fp16 --min-batch 1 --opt-batch 64 --max-batch 256 [--device N]
              [--cache DIR] [--into-bundle] [--version-compatible] [--hardware-compatible]

Ships with the runtime: it needs tensorrt, cuda-python and the bundle's ONNX files, never
torch, onnx or the exporter. Networks are strongly typed (TensorRT 10 deprecated and 11
removed the FP16/INT8 flags): the precision is the ONNX file's. One optimization profile
over the batch axis, a workspace limit, and a timing cache per TensorRT version and GPU.

By default the engines go to the engine cache (vce_deploy/engine_cache.py), so the bundle may
be read-only or shared; --into-bundle adds them to the bundle and its manifest instead (a
staging copy, verified, renamed into place). Running them: vce_deploy/backends/tensorrt.py.

Written to the TensorRT 10/11 Python API and NOT RUN HERE (no GPU, no TensorRT on the machine
it was written on); tests drive it with stand-ins. See docs/edge.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from . import engine_cache
from .bundle import Bundle, EngineInfo, FileEntry, default_bundle_path, file_entry, write_manifest
from .bundle_swap import atomic_directory
from .contract import MODELS, PRECISIONS, TENSORRT_FORMS
from .errors import BackendError, VCEError
from .fsio import atomic_write_bytes

DEFAULT_WORKSPACE_MIB = 1024


def engine_path(role: str, precision: str) -> str:
    """Where --into-bundle puts an engine, relative to the bundle."""
    return f"engines/{role}.{precision}.plan"


def profile_shapes(entry: FileEntry, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, tuple]:
    """input name -> (min, opt, max) shapes, the batch axis (the one named dimension) varied."""
    def shape(spec, batch):
        return tuple(batch if isinstance(d, str) else int(d) for d in spec.shape)

    return {spec.name: tuple(shape(spec, b) for b in (min_batch, opt_batch, max_batch)) for spec in entry.inputs}


def trtexec_command(bundle: Path, entry: FileEntry, out: Path, min_batch: int, opt_batch: int,
                    max_batch: int, workspace_mib: int, timing_cache: Path, device_id: int = 0) -> str:
    """The trtexec invocation that builds the same engine (for users who prefer it, or to debug)."""
    shapes = profile_shapes(entry, min_batch, opt_batch, max_batch)
    spec = {kind: ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in shapes.items())
            for i, kind in enumerate(("min", "opt", "max"))}
    return (f"trtexec --onnx={bundle / entry.path} --saveEngine={out} --device={device_id} "
            f"--stronglyTyped --minShapes={spec['min']} --optShapes={spec['opt']} --maxShapes={spec['max']} "
            f"--memPoolSize=workspace:{workspace_mib}M --timingCacheFile={timing_cache}")


@dataclasses.dataclass(frozen=True)
class Target:
    """The TensorRT and GPU an engine is built on (and so, for: DESIGN.md "Bundle")."""

    trt: object
    device_id: int
    gpu_name: str
    capability: str


def load_target(device_id: int) -> Target:
    """TensorRT >= 10 and GPU `device_id`, made current on this thread: TensorRT builds on the
    current device, so without this every build would run on, and be recorded for, GPU 0."""
    from .backends import cuda
    from .backends.tensorrt import _trt

    trt = _trt()  # refuses a missing or pre-10 TensorRT by name
    count = cuda.gpu_count()
    if count == 0:
        raise BackendError(f"tensorrt {trt.__version__} is installed, but no CUDA GPU is visible (or cuda-python is "
                           "missing): TensorRT builds engines on the GPU they will run on")
    if not 0 <= device_id < count:
        raise BackendError(f"--device {device_id}: expected an index from 0 to {count - 1} (the CUDA GPUs visible here)")
    cuda.set_device(device_id)
    name, capability = cuda.device_properties(device_id)
    return Target(trt, device_id, name, capability)


class EngineBuilder:
    """Parse and describe a network (inputs, outputs, the batch profile), then build it."""

    def __init__(self, target: Target, workspace_mib: int = DEFAULT_WORKSPACE_MIB, version_compatible: bool = False,
                 hardware_compatible: bool = False, verbose: bool = False, log=print):
        trt = self.trt = target.trt
        self.log = log
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        if self.builder is None:
            raise BackendError("trt.Builder could not be created: no usable CUDA device for TensorRT")
        self.config = self.builder.create_builder_config()
        self.config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        # TensorRT sets TF32 in every new config: fp32 convolutions would round their inputs to
        # 10-bit mantissas (about 1e-3 off the goldens); the fp32 parity bound is 1e-4. fp16/int8
        # precision lives in the ONNX files (strongly typed), so clearing TF32 touches fp32 layers only.
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:
            self.config.clear_flag(tf32)
        if version_compatible:  # the plan carries its lean runtime: later TensorRT 10.x can run it
            self.config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if hardware_compatible:  # kernels that run on every Ampere-or-newer GPU (a little slower)
            self.config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        self.network = None

    def create_network(self, onnx_path: Path, entry: FileEntry, batches: tuple[int, int, int]) -> None:
        trt = self.trt
        # strongly typed: every tensor keeps the ONNX file's type; no FP16/INT8 builder flags
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        self.network = self.builder.create_network(flags)
        parser = trt.OnnxParser(self.network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT could not parse {onnx_path}: {errors}")
        self._parser = parser  # the parser owns weights the network refers to until the build
        inputs = [self.network.get_input(i) for i in range(self.network.num_inputs)]
        outputs = [self.network.get_output(i) for i in range(self.network.num_outputs)]
        for kind, tensors in (("input", inputs), ("output", outputs)):
            for t in tensors:
                self.log(f"  {entry.role} {kind} {t.name}: shape {tuple(t.shape)} dtype {t.dtype}")
        want = {spec.name for spec in entry.inputs} | {spec.name for spec in entry.outputs}
        got = {t.name for t in inputs} | {t.name for t in outputs}
        if want != got:
            raise BackendError(f"{onnx_path}: expected tensors {sorted(want)} as the manifest says, TensorRT parsed "
                               f"{sorted(got)}")
        profile = self.builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes(entry, *batches).items():
            profile.set_shape(name, low, opt, high)
        self.config.add_optimization_profile(profile)

    def _timing_cache(self, path: Path):
        """The saved timing cache, or a fresh one when there is none or TensorRT rejects it."""
        blob = path.read_bytes() if path.is_file() else b""
        cache = self.config.create_timing_cache(blob)
        if cache is not None and self.config.set_timing_cache(cache, ignore_mismatch=False):
            return
        if blob:
            self.log(f"  timing cache {path} was not accepted by this TensorRT/GPU; building without it")
        cache = self.config.create_timing_cache(b"")
        if cache is None or not self.config.set_timing_cache(cache, ignore_mismatch=False):
            raise BackendError("TensorRT could not create an empty timing cache (create_timing_cache returned "
                               f"{cache!r}); see the TensorRT log above")

    def build(self, timing_cache: Path) -> bytes:
        self._timing_cache(timing_cache)
        serialized = self.builder.build_serialized_network(self.network, self.config)
        if serialized is None:
            raise BackendError("TensorRT failed to build the engine (see its log above)")
        atomic_write_bytes(timing_cache, bytes(memoryview(self.config.get_timing_cache().serialize())))
        return bytes(memoryview(serialized))


def build_engines(bundle_path, precision: str, min_batch: int = 1, opt_batch: int = 64, max_batch: int = 256, *,
                  device: int = 0, cache_dir: Path | None = None, into_bundle: bool = False,
                  version_compatible: bool = False, hardware_compatible: bool = False,
                  workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: Path | None = None,
                  verbose: bool = False, log=print) -> list[Path]:
    """Build encoder and convertor engines for `precision` on GPU `device`; returns the plan
    paths. Raises BackendError (nothing written) without a usable TensorRT or GPU."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch profile: expected 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    bundle = Bundle.load(bundle_path, verify=True)
    # int8: the symmetric QDQ form, the only one TensorRT's explicit quantization takes
    entries = {role: bundle.model_entry(role, precision, "onnx", TENSORRT_FORMS) for role in MODELS}
    target = load_target(device)
    from .backends import cuda

    if hardware_compatible and cuda.tegra_gpu():
        raise BackendError("--hardware-compatible: TensorRT supports hardware compatibility on discrete Ampere-or-newer "
                           "GPUs, not on JetPack; build a plain engine on each Jetson (docs/edge.md)")
    trt_version = target.trt.__version__
    root = Path(cache_dir) if cache_dir is not None else engine_cache.default_cache_dir()
    timing_cache = Path(timing_cache) if timing_cache else engine_cache.timing_cache_path(
        root, trt_version, target.gpu_name, target.capability)
    log(f"TensorRT {trt_version} on cuda:{device} {target.gpu_name} (compute capability {target.capability}); "
        f"timing cache {timing_cache}")
    info = EngineInfo(tensorrt_version=trt_version, compute_capability=target.capability, min_batch=min_batch,
                      opt_batch=opt_batch, max_batch=max_batch, gpu_name=target.gpu_name,
                      version_compatible=version_compatible, hardware_compatible=hardware_compatible)
    folder = engine_cache.target_dir(root, trt_version, target.gpu_name, target.capability, version_compatible,
                                     hardware_compatible)
    plans = {}
    for role, entry in entries.items():
        out = (bundle.path / engine_path(role, precision) if into_bundle
               else engine_cache.plan_path(folder, entry.sha256, role, precision))
        log("  equivalent: " + trtexec_command(bundle.path, entry, out, min_batch, opt_batch, max_batch, workspace_mib,
                                               timing_cache, device))
        builder = EngineBuilder(target, workspace_mib, version_compatible, hardware_compatible, verbose, log)
        builder.create_network(bundle.file(entry.path), entry, (min_batch, opt_batch, max_batch))
        plans[role] = builder.build(timing_cache)
        log(f"  built {role} at {precision}: {len(plans[role])} bytes")
    if into_bundle:
        return _into_bundle(bundle, entries, precision, plans, info, log)
    written = [engine_cache.store(folder, entries[role].sha256, role, precision, plan, info).plan
               for role, plan in plans.items()]
    for path in written:
        log(f"  wrote {path}")
    return written


def _into_bundle(bundle: Bundle, entries: dict, precision: str, plans: dict, info: EngineInfo, log) -> list[Path]:
    """Add the engines to the bundle and its manifest: staged, verified, renamed into place."""
    files = dict(bundle.manifest.files)
    with atomic_directory(bundle.path) as stage:
        shutil.copytree(bundle.path, stage, dirs_exist_ok=True)
        for role, plan in plans.items():
            rel = engine_path(role, precision)
            atomic_write_bytes(stage / rel, plan)
            files[rel] = file_entry(stage, rel, role=role, format="tensorrt", precision=precision,
                                    inputs=entries[role].inputs, outputs=entries[role].outputs, engine=info)
        write_manifest(stage, dataclasses.replace(bundle.manifest, files=files))
        Bundle.load(stage, verify=True)
    written = [bundle.path / engine_path(role, precision) for role in plans]
    for path in written:
        log(f"  wrote {path} (listed in the manifest)")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", default=None, help="bundle directory (default: the shipped bundle)")
    parser.add_argument("--precision", default="fp16", choices=PRECISIONS, help="which ONNX graphs (default fp16)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--device", type=int, default=0, help="CUDA device index to build on and for (default 0)")
    parser.add_argument("--cache", default=None,
                        help=f"engine cache directory (default ${engine_cache.CACHE_ENV} or ~/.cache/vce_deploy/engines)")
    parser.add_argument("--into-bundle", action="store_true", help="write the engines into the bundle instead")
    parser.add_argument("--version-compatible", action="store_true",
                        help="an engine later TensorRT versions of the same major can run")
    parser.add_argument("--hardware-compatible", action="store_true",
                        help="an engine every Ampere-or-newer GPU can run (compute capability >= 8.0)")
    parser.add_argument("--workspace-mib", type=int, default=DEFAULT_WORKSPACE_MIB)
    parser.add_argument("--timing-cache", default=None, help="default: one per TensorRT version and GPU in the cache")
    parser.add_argument("--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    """`vce build`: 0 with the engines written, 1 with the reason and nothing written."""
    try:
        bundle = args.bundle if args.bundle is not None else default_bundle_path()
        build_engines(bundle, args.precision, args.min_batch, args.opt_batch, args.max_batch, device=args.device,
                      cache_dir=Path(args.cache) if args.cache else None, into_bundle=args.into_bundle,
                      version_compatible=args.version_compatible, hardware_compatible=args.hardware_compatible,
                      workspace_mib=args.workspace_mib,
                      timing_cache=Path(args.timing_cache) if args.timing_cache else None, verbose=args.verbose)
    except (VCEError, ValueError, OSError) as err:
        print(f"vce build: cannot build: {err}. Nothing was written.", file=sys.stderr)
        return 1
    return 0

