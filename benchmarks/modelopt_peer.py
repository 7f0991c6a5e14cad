"""NVIDIA ModelOpt's ONNX PTQ as a peer in onnx_bench.py, run by the Python of the environment ModelOpt lives in
(it needs its own torch and ONNX packages; keep it apart from lowbit's):

    python -m venv benchmarks/.venv-modelopt
    benchmarks/.venv-modelopt/bin/pip install torch==2.13.0 "nvidia-modelopt[onnx]==0.47.0"

    benchmarks/.venv-modelopt/bin/python benchmarks/modelopt_peer.py SRC.onnx DST.onnx CALIB.npy INPUT METHOD

CALIB is an .npy of the samples of the one input INPUT, or an .npz with one array per input (INPUT is then unused).

Quantizes SRC with ``modelopt.onnx.quantization.quantize`` (INT8, calibration method METHOD: entropy, ModelOpt's
default, or max; calibration on the CPU execution provider; the float remainder kept in FP32, as the other CPU
rows) and prints one JSON line: wall seconds and how far peak resident memory rose after the samples were loaded.
"""

from __future__ import annotations

import json
import sys
import time

from _common import reset_peak_memory, status_mb  # numpy only: runs in ModelOpt's environment too


def main() -> None:
    src, dst, calib_path, input_name, method = sys.argv[1:6]
    import numpy as np
    from modelopt.onnx.quantization import quantize

    # CALIB.npz: one array per model input (INPUT is then ignored); CALIB.npy: the array of INPUT
    calib = dict(np.load(calib_path)) if calib_path.endswith(".npz") else {input_name: np.load(calib_path)}
    base = reset_peak_memory()
    t0 = time.perf_counter()
    quantize(
        src,
        quantize_mode="int8",
        calibration_data=calib,
        calibration_method=method,
        calibration_eps=["cpu"],
        high_precision_dtype="fp32",
        output_path=dst,
        log_level="ERROR",
    )
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    print(json.dumps({"quantize_s": seconds, "process_mb": base,
                      "peak_mb": None if peak is None or base is None else peak - base}))  # fmt: skip


if __name__ == "__main__":
    main()
