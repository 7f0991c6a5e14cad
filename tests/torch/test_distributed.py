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
    from lowbit.errors import CalibrationError
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
    q = lt.quantize(models.convnet(), "w4a8", calib=mine, rounding="gptq", progress=False)
    for name, qz in lt.quantizers(q).items():
        if qz.has_codes:
            scales[f"codes/{name}"] = qz.codes.numpy()
    try:
        lt.quantize(models.convnet(), "w4a8", calib=mine, rounding="adaround", progress=False)
    except CalibrationError as exc:
        scales["refused"] = np.array(str(exc))
    np.savez(f"{out}/rank{rank}.npz", **scales)
    dist.destroy_process_group()
    """
)


# QAT: W4A8 with learned scales and activation ranges that follow the data for the first steps; each rank trains
# DDP on its half of every batch. The same script with one process (no DDP) is the reference.
QAT_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    import lowbit.torch as lt
    from torch import nn
    from tests.torch import models

    out = sys.argv[1]
    distributed = "RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    rank, size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4))
    data = models.batches(4, batch=8, seed=5)
    target = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cfg = lt.preset("w4a8").with_learned_scales()
    q = lt.quantize(model, cfg, calib=list(lt.shard(data[:2])), progress=False)
    for qz in lt.quantizers(q).values():
        if not qz.is_weight:
            qz.observe_steps = 2
    q.train()
    net = lt.ddp(q) if distributed else q
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    per = 8 // size
    for x, y in zip(data, target):
        mine = slice(rank * per, (rank + 1) * per)
        loss = nn.functional.mse_loss(net(x[mine]), y[mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save(q.state_dict(), out)
    if distributed:
        dist.destroy_process_group()
    """
)


def _data() -> list[torch.Tensor]:
    return [b * (1 + i) for i, b in enumerate(models.batches(6, seed=3))]  # as SCRIPT's: the shards differ


def _run(tmp_path: Path, source: str, *args: str, ranks: int = 2) -> None:
    """``source`` as a script on ``ranks`` processes under torchrun (1: a plain Python process)."""
    script = tmp_path / "script.py"
    script.write_text(source)
    path = os.pathsep.join([str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    done = subprocess.run([sys.executable, *launcher, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _torchrun(tmp_path: Path, methods: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    _run(tmp_path, SCRIPT, str(tmp_path), ",".join(methods))
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


def test_gptq_on_two_ranks_rounds_with_the_second_moments_of_all_the_data(tmp_path):
    ranks = _torchrun(tmp_path, ("minmax",))
    one = lt.quantize(models.convnet(), "w4a8", calib=_data(), rounding="gptq", progress=False)
    half = lt.quantize(models.convnet(), "w4a8", calib=_data()[:3], rounding="gptq", progress=False)
    codes = {name: qz.codes.numpy() for name, qz in lt.quantizers(one).items() if qz.has_codes}
    assert codes and all(f"codes/{name}" in ranks[0] for name in codes)
    assert "rounding='adaround' searches on samples of the data" in str(ranks[0]["refused"])
    for name, expected in codes.items():
        np.testing.assert_array_equal(ranks[0][f"codes/{name}"], ranks[1][f"codes/{name}"])  # one H on every rank
        # H summed over ranks equals one process's up to float64 summation order: the codes agree but for ties
        assert np.mean(ranks[0][f"codes/{name}"] == expected) > 0.99, name
    mine = lt.quantizers(half)
    assert any(not np.array_equal(mine[n].codes.numpy(), codes[n]) for n in codes)  # half the data is not enough


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


def test_a_qat_step_on_two_ddp_ranks_equals_a_step_on_one_process_with_the_global_batch(tmp_path):
    _run(tmp_path, QAT_SCRIPT, str(tmp_path / "two.pt"))
    _run(tmp_path, QAT_SCRIPT, str(tmp_path / "one.pt"), ranks=1)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(k.endswith("input_quantizer.scale") for k in one)  # the learned activation scales are compared
