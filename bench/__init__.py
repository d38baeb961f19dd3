"""Benchmarks, split by concern: `python -m bench` (see bench/__main__.py).

  machine.py  CPU model and flags, load, versions, peak, FLOPs per conversion
  peers.py    the contenders: runtime backends and the PyTorch peers in their strongest forms
  timing.py   warm-up and interleaved rounds (median and spread over rounds)
  run.py      one run: inputs, warm-up, timing, outputs
  report.py   records, the issue's targets, the markdown table
  profile.py  Converter.convert at batch 1, step by step
  int8_formats.py  which int8 QDQ form ONNX Runtime's x86 kernels run fast (needs the exporter)
  openvino_graph.py  which kernels OpenVINO's CPU plugin runs per convertor form, and their times
  latency.py  `python bench/latency.py`: the same benchmark as `python -m bench`, from a clone
  gpu_check.py  the GPU check on a device (`python -m bench.gpu_check`, scripts/gpu_check.sh)
"""
