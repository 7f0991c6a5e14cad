"""NVIDIA ModelOpt's own entropy calibration, run by the Python of the environment ModelOpt lives in (see
modelopt_peer.py for how to install it):

    benchmarks/.venv-modelopt/bin/python benchmarks/modelopt_entropy.py [--hists] IN.npz [IN2.npz ...] OUT.json

Each IN.npz holds, per tensor ``k``, either ``hist_k`` (counts) and ``edges_k`` (their edges): ModelOpt's
``_compute_amax_entropy`` on that histogram; or ``batches_k`` (an object array of arrays, one per calibration
batch): ModelOpt's ``HistogramCalibrator`` (2048 bins, its default torch histograms) fed those batches in order,
then ``compute_amax("entropy")``. The files are read one tensor at a time (several files: one import of torch for
tensors that do not fit in memory together). OUT.json maps each ``k`` to {"amax": ..., "width": ..., "bins": ...,
"seconds": ...} (seconds: the entropy search alone; batches also give "collect_seconds", the histogram updates).
``--hists``: batches also give "hist" and "edges", the histogram ModelOpt searched (the counts as its
``compute_amax`` reads them, before its search gives bin 0 bin 1's count), so that another search can run on
exactly them. Needs only NumPy, torch and ModelOpt.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import numpy as np
    import torch
    from modelopt.torch.quantization.calib.histogram import HistogramCalibrator, _compute_amax_entropy

    args = sys.argv[1:]
    hists = "--hists" in args
    args = [a for a in args if a != "--hists"]
    if len(args) < 2:
        sys.exit(f"usage: {sys.argv[0]} [--hists] IN.npz [IN2.npz ...] OUT.json")
    *sources, dst = args
    out = {}
    for src in sources:
        data = np.load(src, allow_pickle=True)
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
                t0 = time.perf_counter()
                for batch in data[key]:
                    calibrator.collect(torch.from_numpy(np.asarray(batch, dtype=np.float32)))
                collect_seconds = time.perf_counter() - t0
                counts = calibrator._calib_hist
                counts = counts.int().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
                edges = calibrator._calib_bin_edges
                edges = edges.cpu().numpy() if isinstance(edges, torch.Tensor) else np.asarray(edges)
                t0 = time.perf_counter()
                amax = float(calibrator.compute_amax("entropy"))
                width = float(edges[1] - edges[0])
                out[name] = {"amax": amax, "width": width, "bins": len(edges) - 1, "seconds": time.perf_counter() - t0,
                             "collect_seconds": collect_seconds}  # fmt: skip
                if hists:
                    out[name] |= {"hist": counts.tolist(), "edges": edges.astype(np.float64).tolist()}
        del data
    with open(dst, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
