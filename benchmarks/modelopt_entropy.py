"""NVIDIA ModelOpt's own entropy calibration, run by the Python of the environment ModelOpt lives in (see
modelopt_peer.py for how to install it):

    benchmarks/.venv-modelopt/bin/python benchmarks/modelopt_entropy.py IN.npz OUT.json

IN.npz holds, per tensor ``k``, either ``hist_k`` (counts) and ``edges_k`` (their edges): ModelOpt's
``_compute_amax_entropy`` on that histogram; or ``batches_k`` (an object array of arrays, one per calibration
batch): ModelOpt's ``HistogramCalibrator`` (2048 bins, as its default) fed those batches in order, then
``compute_amax("entropy")``. OUT.json maps each ``k`` to {"amax": ..., "width": ..., "bins": ..., "seconds": ...}.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import numpy as np
    import torch
    from modelopt.torch.quantization.calib.histogram import HistogramCalibrator, _compute_amax_entropy

    src, dst = sys.argv[1:3]
    data = np.load(src, allow_pickle=True)
    out = {}
    for key in data.files:
        kind, _, name = key.partition("_")
        if kind == "hist":
            hist, edges = data[key].copy(), data[f"edges_{name}"]
            t0 = time.perf_counter()
            amax = float(_compute_amax_entropy(hist, edges, 8, False))
            width = float(edges[1] - edges[0])
            out[name] = {"amax": amax, "width": width, "bins": len(hist), "seconds": time.perf_counter() - t0}
        elif kind == "batches":
            calibrator = HistogramCalibrator(num_bits=8, axis=None, unsigned=False)
            for batch in data[key]:
                calibrator.collect(torch.from_numpy(np.asarray(batch, dtype=np.float32)))
            t0 = time.perf_counter()
            amax = float(calibrator.compute_amax("entropy"))
            edges = calibrator._calib_bin_edges
            width = float(edges[1] - edges[0])
            out[name] = {"amax": amax, "width": width, "bins": len(edges) - 1, "seconds": time.perf_counter() - t0}
    with open(dst, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
