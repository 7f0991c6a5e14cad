"""lowbit.torch under torch.distributed: two real processes (torchrun, gloo, CPU) against one process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

import lowbit.torch as lt
from lowbit.core import QuantSpec
from lowbit.torch import distributed
from tests.torch import models

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("minmax", "percentile", "entropy", "mse")

# Each rank quantizes the same model on its shard with every method and writes its scales; rank 0 also checks
# that shard() gave each rank its own batches.
SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch.distributed as dist
    import lowbit.torch as lt
    from tests.torch import models

    out, methods = sys.argv[1], sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = [b * (1 + i) for i, b in enumerate(models.batches(6, seed=3))]  # the shards differ
    mine = list(lt.shard(data))
    scales = {"batches": np.array([float(b.sum()) for b in mine])}
    for method in methods:
        cfg = lt.preset("int8").with_method(method)
        q = lt.quantize(models.convnet(), cfg, calib=mine, progress=False)
        for name, qz in lt.quantizers(q).items():
            scales[f"{method}/{name}"] = qz.scale.detach().numpy()
    np.savez(f"{out}/rank{rank}.npz", **scales)
    dist.destroy_process_group()
    """
)


def _data() -> list[torch.Tensor]:
    return [b * (1 + i) for i, b in enumerate(models.batches(6, seed=3))]  # as SCRIPT's: the shards differ


def _torchrun(tmp_path: Path, methods: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    script = tmp_path / "calibrate.py"
    script.write_text(SCRIPT)
    path = os.pathsep.join([str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path), ",".join(methods)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]


def test_two_ranks_calibrate_to_the_scales_of_one_process_on_all_the_data_bit_for_bit(tmp_path):
    ranks = _torchrun(tmp_path, METHODS)
    data = _data()
    # shard(): contiguous halves, each batch once.
    sums = np.concatenate([r["batches"] for r in ranks])
    np.testing.assert_array_equal(sums, [float(b.sum()) for b in data])
    for method in METHODS:
        cfg = lt.preset("int8").with_method(method)
        one = lt.quantize(models.convnet(), cfg, calib=data, progress=False)
        for name, qz in lt.quantizers(one).items():
            expected = qz.scale.detach().numpy()
            for r in ranks:
                np.testing.assert_array_equal(r[f"{method}/{name}"], expected, err_msg=f"{method} {name}")


def test_calibration_on_half_the_data_differs_so_the_merge_is_what_makes_them_equal():
    data = _data()
    cfg = lt.preset("int8").with_method("minmax")
    whole = lt.quantizers(lt.quantize(models.convnet(), cfg, calib=data, progress=False))
    half = lt.quantizers(lt.quantize(models.convnet(), cfg, calib=data[:3], progress=False))
    assert any(not torch.equal(whole[n].scale, half[n].scale) for n in whole)


def test_outside_a_process_group_everything_is_one_rank():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert list(lt.shard([1, 2, 3])) == [1, 2, 3]
    q = lt.quantize(models.convnet(), "int8", calib=models.batches(2), progress=False)
    qz = next(iter(lt.quantizers(q).values()))
    distributed.merge_calibration([qz])  # nothing to do


def test_a_quantizer_folds_in_another_quantizers_statistics_as_if_it_had_seen_their_data():
    a, b, both = (lt.TensorQuantizer(QuantSpec(bits=8), method="entropy") for _ in range(3))
    x, y = torch.randn(1000), 3 * torch.randn(1000)
    for q, batches in ((a, [x]), (b, [y]), (both, [x, y])):
        q.mode = "calibrate"
        for t in batches:
            q(t)
    a.merge_calibration_state(b.calibration_state())
    a.load_calibration()
    both.load_calibration()
    assert torch.equal(a.scale, both.scale)
    assert lt.TensorQuantizer(QuantSpec(bits=8)).calibration_state() is None
