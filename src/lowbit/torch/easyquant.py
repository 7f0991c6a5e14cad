"""EasyQuant: the scales of a calibrated model searched again, layer by layer, for the quantized output closest in
direction to the FP32 output (Wu et al. 2020, "EasyQuant: Post-training Quantization via Scale Optimization").

    import lowbit.torch as lt
    qmodel = lt.quantize(model, replace(lt.preset("w4a8"), refine="easyquant"), calib=batches)
    report = lt.easyquant(qmodel, batches)        # on a calibrated model: {layer: (cosine before, after)}

For each quantized ``Conv1d``/``Conv2d``/``Conv3d``/``Linear`` layer, in the order the model runs them (a
topological order; module order for a sequential model), with the layer's input taken from the quantized model
(every layer before it already refined and quantized, so the search sees the error that arrives from upstream, as
deployed) and its target from the FP32 model (the float layer on the float model's input), EasyQuant alternates:

  - weights: for each candidate ``f`` of the grid, every output channel's weight scale ``f * s_w[c]``; channel
    ``c``'s output depends on its own scale only, so one forward per candidate scores every channel, and each
    channel takes the factor of highest cosine ``<y_c, y_c*> / (|y_c| |y_c*|)`` of its output to FP32 over the
    calibration data (per-tensor weights: one factor for the layer, by the layer's cosine);
  - the input: one factor ``g`` for the layer's input scale ``g * s_x``, by the cosine of the whole layer output.
    Skipped where the layer has no static per-tensor input quantizer (float, dynamic or per-channel input):
    weights only there.

``s_w``, ``s_x`` are the calibrated scales; the grid is ``points`` factors spaced geometrically over
``[low, high]`` (default 41 in [0.5, 2], 1 among them), so every scale stays within [0.5, 2] times its calibrated
value however many alternations run; a zero point stays the same code (the real range scales about 0), so symmetric
and asymmetric quantizers, per-channel, per-group and per-tensor weights and any bit width are searched alike. A
step keeps the current scales unless a candidate is strictly better, and the weight step is kept only if the layer's
cosine (computed exactly from the per-channel sums) does not drop: a layer's cosine never ends below that of its
starting scales. ``alternations`` rounds of (weights, input), default 2, stopping early when a round changes nothing.

``mse_guard`` (on by default; off: the paper's search): a candidate must also not raise the summed squared error of
its output (per channel for the weights, of the layer for the input) above the current scales'. The cosine is blind
to the output's magnitude: a scale that clips can shrink a whole channel, or the whole layer through its input, and
still raise the cosine; on the logits that costs accuracy. In tests (tests/torch/test_easyquant.py's small convnet,
W4A8) the search without the guard doubled the model's output MSE through its last layer; with it, the MSE fell 20x.

Memory: per layer, per candidate and channel, the sums ``<y, y*>`` and ``|y|^2`` accumulated over the batches
(streaming), never the outputs of every batch; the layer's (quantized-model input, FP32 output) per batch are kept
for the next steps while they fit in ``cache_mb`` (default 256 MB), else recomputed by running the models up to the
layer again on every step.

Cost: per layer, ``2 * alternations`` passes over the calibration batches, each ``points`` forwards of the layer
(plus two partial forwards of the model up to the layer per batch when they are not cached), i.e. about
``4 * 41 = 164`` layer forwards per batch at the defaults: roughly 160 passes of the model over the calibration
data. Measured on FashionMobileNet (benchmarks/torch_models.py: 26 layers; 1,000 28x28 calibration images, one
thread of a 2-core machine): about 8 s a layer, 211-222 s for the model with one other process on the machine
(614 s with three; benchmarks/torch_bench.py).
The cost grows linearly with ``points``, ``alternations`` and the number of calibration images.

With a weight rounding (:mod:`lowbit.torch.rounding`): EasyQuant chooses the scales first, with each weight rounded
to nearest; GPTQ or AdaRound then choose the codes at those scales (:func:`lowbit.torch.quantize` runs them in that
order). Codes chosen before EasyQuant are cleared: they belong to the old scales.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.formats import scales_itself
from lowbit.errors import CalibrationError
from lowbit.torch.layers import QuantMixin
from lowbit.torch.quantizer import TensorQuantizer, evaluating
from lowbit.torch.rounding.capture import run_order, run_to
from lowbit.torch.rounding.roundable import named_subset
from lowbit.torch.runner import is_loop

POINTS = 41  # candidate factors per scale (odd: 1 is the middle one)
LOW, HIGH = 0.5, 2.0  # the candidates' range, as factors of the calibrated scale
ALTERNATIONS = 2  # rounds of (weights, input)
CACHE_MB = 256  # a layer's inputs and FP32 outputs over the batches are kept below this size, else recomputed


def grid(points: int = POINTS, low: float = LOW, high: float = HIGH) -> torch.Tensor:
    """The candidate factors: ``points`` spaced geometrically over ``[low, high]``, and 1, sorted (float64).

    >>> grid(5).tolist()
    [0.5, 0.7071067811865476, 1.0, 1.414213562373095, 2.0]
    """
    if points < 2 or not 0 < low <= 1 <= high:
        raise CalibrationError(f"EasyQuant needs points >= 2 and 0 < low <= 1 <= high, got {points}, {low}, {high}")
    f = torch.exp(torch.linspace(math.log(low), math.log(high), points, dtype=torch.float64))
    f[0], f[-1] = low, high
    f[(f - 1).abs() < 1e-9] = 1.0  # exp(0) computed from logs: snap it
    return torch.unique(torch.cat([f, torch.ones(1, dtype=torch.float64)]))


def refinable(module: nn.Module) -> bool:
    """Whether EasyQuant searches ``module``'s scales: a quantized Conv1d/2d/3d or Linear (not one that keeps a
    BatchNorm for QAT) whose weight quantizer is static and calibrated."""
    if not isinstance(module, QuantMixin) or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return False
    if type(module)._weight_to_quantize is not QuantMixin._weight_to_quantize:  # e.g. a conv with its BN (QAT)
        return False
    q = module.weight_quantizer
    if q.spec.format != "int" or scales_itself(q.spec):  # its scales are a float grid's (or the weight's own)
        return False
    return q.mode == "quantize" and q.calibrated and not q.dynamic


def static_input(module: nn.Module) -> bool:
    """Whether the layer's input has a static, calibrated, per-tensor scale to search."""
    q = module.input_quantizer
    return q.mode == "quantize" and not q.dynamic and q.calibrated and q.scale.numel() == 1


class LayerData:
    """A layer's (input in the quantized model, output in the FP32 model) on each calibration batch, computed as
    it is iterated over and kept for the next iteration while they fit in ``cache_bytes``."""

    def __init__(self, model: nn.Module, name: str, module: nn.Module, batches: list[Any], cache_bytes: int):
        self.model, self.name, self.module, self.batches = model, name, module, batches
        self.cache_bytes = cache_bytes
        self.cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cached is not None:
            yield from self.cached
            return
        keep: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        size = 0
        for batch in self.batches:
            inputs: list[torch.Tensor] = []
            outputs: list[torch.Tensor] = []
            run_to(self.model, self.module, batch, take_output=outputs.append, float_model=True)
            run_to(self.model, self.module, batch, take_input=inputs.append)
            if not inputs or not outputs:
                raise CalibrationError(f"EasyQuant: layer {self.name} did not run on every calibration batch")
            x, y = inputs[0].detach(), outputs[0].detach().float()
            size += x.numel() * x.element_size() + y.numel() * y.element_size()
            if keep is not None and size <= self.cache_bytes:
                keep.append((x, y))
            else:
                keep = None
            yield x, y
        self.cached = keep


class _Scale:
    """A quantizer's scale as factors of its scale at the start: ``set(f)`` with one factor, or (``rows``) one per
    output channel, the first axis of the scale."""

    def __init__(self, q: TensorQuantizer):
        self.q, self.start = q, q.scale.detach().clone()
        self.rows = self.start.dim() >= 1 and self.start.numel() > 1

    def set(self, factor: torch.Tensor) -> None:
        f = factor.to(self.start.device, torch.float32)
        if self.rows:
            f = f.reshape(-1, *[1] * (self.start.dim() - 1))
        else:  # one scale: the factor of every channel is the same
            f = f.reshape(-1)[0].reshape(self.start.shape)
        with torch.no_grad():
            self.q.scale.copy_(self.start * f)


def _sums(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Per output channel (along ``dim``), the sum of ``t`` (float32 reductions, returned as float64)."""
    dims = [d for d in range(t.dim()) if d != dim % t.dim()]
    return t.sum(dim=dims, dtype=torch.float32).double()


def layer_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s output on an input ``x`` already through its input quantizer (what its forward computes on the
    raw input): the quantized weight, the bias on the accumulator's grid."""
    w, b = module.weight_quantizer(module.weight), module._bias(module.bias)
    return F.linear(x, w, b) if isinstance(module, nn.Linear) else module._conv_forward(x, w, b)


def _cosine(dot: torch.Tensor, yy: torch.Tensor, ff: torch.Tensor) -> torch.Tensor:
    """``dot / sqrt(yy * ff)``; 1 where both outputs are zero, 0 where one is."""
    norm = (yy * ff).sqrt()
    return torch.where(norm > 0, dot / norm.clamp_min(1e-300), (yy == ff).to(dot.dtype))


class _Search:
    """One layer's state during the search: its scales, the chosen grid index of each (per output channel for the
    weight), and the streaming sums of the last measured step."""

    def __init__(self, module: nn.Module, data: LayerData, factors: torch.Tensor, mse_guard: bool = True):
        self.module, self.data, self.factors, self.mse_guard = module, data, factors, mse_guard
        self.dim = -1 if isinstance(module, nn.Linear) else 1
        self.channels = module.weight.shape[0]
        self.one = int((factors == 1).nonzero()[0, 0])
        self.weight = _Scale(module.weight_quantizer)
        self.input = _Scale(module.input_quantizer) if static_input(module) else None
        self.w_idx = torch.full((self.channels,), self.one, dtype=torch.long)
        self.x_idx = self.one

    def measure(self, set_candidate, input_moves: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every candidate ``g`` (``set_candidate(g)`` sets the scales), per output channel, ``<y, y*>`` and
        ``|y|^2`` summed over the batches, and ``|y*|^2``; ``y`` the quantized output, ``y*`` the FP32 one.
        ``input_moves``: the candidates change the input's scale (else it is quantized once per batch)."""
        n = len(self.factors)
        dot = torch.zeros(n, self.channels, dtype=torch.float64)
        yy = torch.zeros(n, self.channels, dtype=torch.float64)
        ff = torch.zeros(self.channels, dtype=torch.float64)
        quantize = self.module.input_quantizer
        with torch.no_grad():
            for x, target in self.data:
                ff += _sums(target * target, self.dim).cpu()
                xq = None if input_moves else quantize(x)
                for g in range(n):
                    set_candidate(g)
                    y = layer_output(self.module, quantize(x) if input_moves else xq).float()
                    dot[g] += _sums(y * target, self.dim).cpu()
                    yy[g] += _sums(y * y, self.dim).cpu()
        return dot, yy, ff

    def layer_cosine(self, dot, yy, ff, idx: torch.Tensor) -> float:
        """The whole layer output's cosine with channel ``c`` at candidate ``idx[c]``."""
        pick = idx[None]
        return float(_cosine(dot.gather(0, pick).sum(), yy.gather(0, pick).sum(), ff.sum()))

    def weight_step(self) -> tuple[float, float]:
        """Each output channel's weight scale to its best factor (one for the layer with per-tensor weights).
        Returns the layer's cosine before and after."""
        dot, yy, ff = self.measure(lambda g: self.weight.set(self.factors[g].expand(self.channels)), False)
        before = self.layer_cosine(dot, yy, ff, self.w_idx)
        if self.weight.rows:  # (candidates, channels)
            chosen = _pick(_cosine(dot, yy, ff[None]), yy - 2 * dot + ff[None], self.w_idx, self.mse_guard)
        else:
            err = (yy - 2 * dot + ff[None]).sum(1)
            cos = _cosine(dot.sum(1), yy.sum(1), ff.sum())
            chosen = _pick(cos, err, self.w_idx[:1], self.mse_guard).expand(self.channels)
        after = self.layer_cosine(dot, yy, ff, chosen)
        if after < before:  # better channel by channel, worse as a whole: keep the layer as it was
            chosen, after = self.w_idx, before
        self.w_idx = chosen.clone()
        self.weight.set(self.factors[chosen])
        return before, after

    def input_step(self) -> tuple[float, float]:
        """The input scale to the factor of best layer cosine. Returns the layer's cosine before and after."""
        dot, yy, ff = self.measure(lambda g: self.input.set(self.factors[g]), True)
        cos = _cosine(dot.sum(1), yy.sum(1), ff.sum())  # (candidates,)
        before = float(cos[self.x_idx])
        self.x_idx = int(_pick(cos, (yy - 2 * dot + ff[None]).sum(1), torch.tensor([self.x_idx]), self.mse_guard)[0])
        self.input.set(self.factors[self.x_idx])
        return before, float(cos[self.x_idx])


def _pick(cos: torch.Tensor, err: torch.Tensor, current: torch.Tensor, mse_guard: bool) -> torch.Tensor:
    """Along the candidates (dim 0), the index of the highest cosine, for each column; ``current`` unless strictly
    better. ``mse_guard``: only among the candidates whose squared error is not above the current one's."""
    cos, err, now = cos.reshape(len(cos), -1), err.reshape(len(err), -1), current.reshape(1, -1)
    if mse_guard:
        cos = torch.where(err <= err.gather(0, now), cos, torch.full_like(cos, -2.0))
    best = cos.argmax(0)
    better = cos.gather(0, best[None])[0] > cos.gather(0, now)[0]
    return torch.where(better, best, now[0]).reshape(current.shape)


def refine_layer(
    model: nn.Module, name: str, module: nn.Module, batches: list[Any], factors: torch.Tensor, **options: Any
) -> tuple[float, float]:
    """Search the scales of one layer (see the module docstring); ``options``: ``alternations``, ``cache_mb``,
    ``mse_guard``.
    Returns the layer's output cosine to FP32 with its starting scales and with the chosen ones, both on its inputs
    from the quantized model as it is now."""
    module.weight_quantizer.clear_codes()  # chosen at the old scale
    data = LayerData(model, name, module, batches, int(options.get("cache_mb", CACHE_MB) * 2**20))
    search = _Search(module, data, factors, options.get("mse_guard", True))
    start = after = None
    for _ in range(options.get("alternations", ALTERNATIONS)):
        moved = (search.w_idx.clone(), search.x_idx)
        before, after = search.weight_step()
        start = before if start is None else start
        if search.input is not None:
            _, after = search.input_step()
        if torch.equal(moved[0], search.w_idx) and moved[1] == search.x_idx:
            break  # nothing moved: the next round would measure the same
    return start, after


def _chosen(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Module]:
    found = {name: m for name, m in model.named_modules() if refinable(m)}
    kind = "a calibrated, statically quantized Conv/Linear layer"
    return named_subset(found, names, "EasyQuant cannot refine", kind, "Refinable")


def easyquant(
    model: nn.Module,
    calib: Iterable[Any],
    *,
    names: Iterable[str] | None = None,
    points: int = POINTS,
    low: float = LOW,
    high: float = HIGH,
    alternations: int = ALTERNATIONS,
    cache_mb: float = CACHE_MB,
    mse_guard: bool = True,
    progress: bool = True,
) -> dict[str, tuple[float, float]]:
    """Search the weight and input scales of ``model``'s quantized Conv/Linear layers (all, or those in ``names``)
    for the output cosine to FP32 on the calibration batches ``calib`` (see the module docstring). Returns, per
    layer, its output's cosine to FP32 with the starting scales and with the chosen ones. Call it on a calibrated
    model (:func:`lowbit.torch.quantize` does with ``refine="easyquant"``); the model runs in eval mode."""
    if is_loop(calib):
        raise CalibrationError(
            "refine='easyquant' needs calibration batches (a list of inputs), not a forward loop: it runs the float "
            "and the quantized model on the same batches, once per layer"
        )
    if alternations < 1:
        raise CalibrationError(f"EasyQuant needs alternations >= 1, got {alternations}")
    factors = grid(points, low, high)
    found = _chosen(model, names)
    kinds = {n: (m.input_quantizer.spec.scale_kind, m.weight_quantizer.spec.scale_kind) for n, m in found.items()}
    pow2 = [n for n, k in kinds.items() if "pow2" in k]
    if pow2:
        raise CalibrationError(
            f"refine='easyquant' searches scales by factors that are not powers of two; {pow2[0]} has scale='pow2'"
        )
    batches = list(calib)
    if not found:
        return {}
    if not batches:
        raise CalibrationError("refine='easyquant' needs calibration batches; calib is empty")
    report: dict[str, tuple[float, float]] = {}
    with evaluating(model):
        order = run_order(model, found, batches[0])
        bar = tqdm(order, desc="EasyQuant", unit="layer", disable=not progress, leave=False)
        for name in bar:
            report[name] = refine_layer(
                model,
                name,
                found[name],
                batches,
                factors,
                alternations=alternations,
                cache_mb=cache_mb,
                mse_guard=mse_guard,
            )
            bar.set_postfix(cosine=f"{report[name][1]:.4f}")
    return report
