"""AdaRound: weight codes learned, layer by layer, so that each layer's output on the *quantized* model's inputs
matches the float model's.

    import lowbit.torch as lt
    qmodel = lt.quantize(model, "w4a8", calib=batches, rounding="adaround")   # or, on a quantized model:
    lt.adaround(qmodel, batches)

Each weight may take the code below it or the one above it (``floor(w / s) + h``, ``h`` in [0, 1]); ``h`` starts
at the weight's own fractional part (so the first guess is plain rounding), is learned by gradient descent on the
layer's output error, and is pushed to 0 or 1 by a regularizer whose sharpness grows over the iterations, so that
every weight ends on one of its two neighbouring codes (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization"). The scales and zero points stay those of plain rounding; only the codes change,
stored in each weight quantizer (:meth:`~lowbit.torch.quantizer.TensorQuantizer.set_codes`), so the model's
layout, its ONNX export and its size do not change.

The objective is the one AdaRound calls asymmetric: the layer's input comes from the quantized model, with every
layer before it already rounded and every activation quantized, and its target output from the float model, so
each layer also absorbs the error that arrives from upstream. The layers are rounded in the order the model runs
them. Each layer's data are a bounded random sample of its output positions (pixels, tokens) and the input
patches that produce them, so memory does not grow with the number of calibration images.

``drop`` (QDrop, Wei et al. 2022) mixes the two: while learning, each input element comes from the float model
with that probability, else from the quantized one, so the codes lean less on the exact error upstream. It costs
drawing the mix at every step (about 1.5x the time on a mobile network). It does not make the codes independent of
upstream: choose bit widths before rounding, not after.

Where it matters: 4-bit weights, where GPTQ's one-pass rounding leaves much on the table (EfficientNet-Lite0 W4A8
in docs/BENCHMARKS.md), and INT8 models whose activations are quantized hard (depthwise convolutions).
It costs a partial pass of the calibration data through the model per layer plus the optimisation: minutes on a
CPU for a mobile network on 64 images.

Rounded: the layers of :mod:`lowbit.torch.rounding.roundable`; a convolution's input patches come from
:func:`lowbit.torch.rounding.patches.conv_patches`, gathered at the sampled positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import CalibrationError
from lowbit.torch.quantizer import evaluating, param_view
from lowbit.torch.rounding.capture import run_order, run_to
from lowbit.torch.rounding.patches import conv_patches, output_positions
from lowbit.torch.rounding.registry import register
from lowbit.torch.rounding.roundable import chosen_layers, weight_matrix
from lowbit.torch.runner import is_loop

ITERATIONS = 500  # gradient steps per layer
ROWS = 4096  # output positions (pixels, tokens) sampled per layer, over all the calibration batches
BATCH_ROWS = 1024  # rows per gradient step
DEPTHWISE_BATCH_ROWS = 256  # a depthwise channel has a handful of weights: fewer rows do, and it is memory-bound
LEARNING_RATE = 1e-2
REGULARIZATION = 0.01  # weight of the term that pushes h to 0 or 1
WARMUP = 0.2  # fraction of the iterations learned without the regularizer
BETA = (20.0, 2.0)  # sharpness of the regularizer, annealed from the first to the second
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches 0 and 1 exactly


class Sample:
    """Picks a layer's output positions, the same in every pass (seeded by batch), and gathers the input patch
    of each (rows, groups, columns) and the output there (rows, channels)."""

    def __init__(self, module: nn.Module, rows_per_batch: int, seed: int):
        self.module = module
        self.rows_per_batch = rows_per_batch
        self.seed = seed

    def positions(self, batch: int, count: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + batch)
        return torch.randperm(count, generator=g)[: self.rows_per_batch]

    def output(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        if isinstance(self.module, nn.Linear):
            flat = y.reshape(-1, y.shape[-1])
        else:
            flat = y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, y.shape[1])
        return flat[self.positions(batch, flat.shape[0]).to(flat.device)].detach().float()

    def patches(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            flat = x.reshape(-1, x.shape[-1])
            return flat[self.positions(batch, flat.shape[0]).to(flat.device)][:, None, :].detach().float()
        pos = self.positions(batch, output_positions(m, x, "AdaRound")).to(x.device)
        return conv_patches(m, x, "AdaRound", pos).detach().float()


def _batches(calib: Any) -> list[Any]:
    if is_loop(calib):
        raise CalibrationError(
            "AdaRound needs calibration batches (a list of inputs), not a forward loop: it runs the float and the "
            "quantized model on the same batches, once per layer"
        )
    batches = list(calib)
    if not batches:
        raise CalibrationError("AdaRound needs calibration batches; calib is empty")
    return batches


def _collect(
    model: nn.Module, name: str, module: nn.Module, sample: Sample, batches: list[Any], keep_float: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The layer's quantized input patches, its float outputs and (``keep_float``) its float model's input patches,
    at the sampled positions of every batch."""
    inputs: list[torch.Tensor] = []
    float_inputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    for i, batch in enumerate(batches):
        run_to(
            model,
            module,
            batch,
            take_input=(lambda x, i=i: float_inputs.append(sample.patches(x, i))) if keep_float else None,
            take_output=lambda y, i=i: targets.append(sample.output(y, i)),
            float_model=True,
        )
        # Quantizing the gathered patches equals gathering the quantized input: the quantizer is elementwise, and
        # it keeps the padding's zeros (zero is always on the grid).
        run_to(
            model, module, batch, take_input=lambda x, i=i: inputs.append(module.input_quantizer(sample.patches(x, i)))
        )
    if len(inputs) != len(batches) or len(targets) != len(batches):
        raise CalibrationError(f"AdaRound: layer {name} did not run on every calibration batch; it cannot be rounded")
    return torch.cat(inputs), torch.cat(targets), torch.cat(float_inputs) if keep_float else None


def _rectified(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def round_layer(
    module: nn.Module,
    patches: torch.Tensor,
    target: torch.Tensor,
    *,
    iterations: int = ITERATIONS,
    float_patches: torch.Tensor | None = None,
    drop: float = 0.0,
) -> tuple[float, float]:
    """Learn ``module``'s weight codes so that its output on ``patches`` (rows, groups, columns) comes close to
    ``target`` (rows, channels), and store them in its weight quantizer. Returns the mean square output error per
    row before (plain rounding) and after, both on ``patches``.

    ``drop``: during learning, each input element is taken from ``float_patches`` (the float model's input at the
    same positions) with this probability, else from ``patches`` (QDrop)."""
    q = module.weight_quantizer
    w = module.weight.detach().float()
    scale = param_view(q.scale.detach(), w.shape, q.spec).expand(w.shape).float()
    zero = param_view(q.zero_point.detach(), w.shape, q.spec).expand(w.shape).float()
    ws, ss, zs = (weight_matrix(module, t) for t in (w, scale, zero))  # (groups, out per group, columns)
    base = torch.floor(ws / ss) + zs
    frac = (ws / ss + zs - base).clamp(0.01, 0.99)
    v = (-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)).requires_grad_(True)
    bias = module._bias(module.bias) if module.bias is not None else None
    layer = _Layer(base, ss, zs, None if bias is None else bias.detach().float(), q.spec.qmin, q.spec.qmax)
    order = torch.randperm(len(patches), generator=torch.Generator().manual_seed(0)).to(patches.device)
    patches, target = layer.arrange(patches[order]), target[order]  # the batches' rows mixed
    float_patches = layer.arrange(float_patches[order]) if drop and float_patches is not None else None
    before = layer.error(patches, target, (frac >= 0.5).float())
    _learn(layer, v, patches, target, float_patches, drop, iterations)
    hard = (v.detach() >= 0).float()
    after = layer.error(patches, target, hard)
    if after > before:  # the learning ended worse than plain rounding, even on its own rows: keep plain rounding
        hard, after = (frac >= 0.5).float(), before
    q.set_codes(torch.clamp(base + hard, layer.qmin, layer.qmax).reshape(w.shape).round().to(torch.int32))
    return before / len(target), after / len(target)


class _Layer:
    """A layer's output as a function of its rounding choice ``h`` (0: down, 1: up) for each weight."""

    def __init__(self, base, ss, zs, bias, qmin: int, qmax: int):
        self.base, self.ss, self.zs, self.bias, self.qmin, self.qmax = base, ss, zs, bias, qmin, qmax
        self.depthwise = base.shape[1] == 1

    def arrange(self, patches: torch.Tensor) -> torch.Tensor:
        """(rows, groups, columns), or for a depthwise layer (groups, rows, columns): a batched matrix-vector
        product, groups first."""
        return patches.transpose(0, 1).contiguous() if self.depthwise else patches

    def rows(self, p: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        return p[:, idx] if self.depthwise else p[idx]

    def forward(self, p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        wq = (torch.clamp(self.base + h, self.qmin, self.qmax) - self.zs) * self.ss
        if self.depthwise:
            y = torch.bmm(p, wq.transpose(1, 2))[..., 0].T  # (rows, groups)
        else:
            y = torch.einsum("rgk,gok->rgo", p, wq).reshape(len(p), -1)
        return y if self.bias is None else y + self.bias

    def error(self, patches: torch.Tensor, target: torch.Tensor, h: torch.Tensor) -> float:
        """The summed square output error over every row."""
        with torch.no_grad():
            return sum(
                float((self.forward(self.rows(patches, slice(i, i + 4096)), h) - target[i : i + 4096]).pow(2).sum())
                for i in range(0, target.shape[0], 4096)
            )


def _learn(layer: _Layer, v, patches, target, float_patches, drop: float, iterations: int) -> None:
    """AdaRound's optimisation of ``v`` (the rectified sigmoid of which is the rounding choice): the output error
    on windows of rows, plus, after the warm-up, the regularizer that pushes each choice to 0 or 1."""
    mixing = torch.Generator(device=patches.device).manual_seed(1)
    optimizer = torch.optim.Adam([v], lr=LEARNING_RATE)
    count = target.shape[0]
    size = min(count, DEPTHWISE_BATCH_ROWS if layer.depthwise else BATCH_ROWS)
    warm = int(WARMUP * iterations)
    for step in range(iterations):
        start = (step * size) % count  # the rows are a random sample already: windows over them are random batches
        window = slice(start, min(start + size, count))
        h = _rectified(v)
        p = layer.rows(patches, window)
        if float_patches is not None:
            f = layer.rows(float_patches, window)
            p = torch.where(torch.rand(p.shape, generator=mixing, device=p.device) < drop, f, p)
        loss = (layer.forward(p, h) - target[window]).pow(2).sum(1).mean()
        if step >= warm:
            beta = BETA[0] + (BETA[1] - BETA[0]) * (step - warm) / max(iterations - warm, 1)
            loss = loss + REGULARIZATION * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@register("adaround", batches_only=True)
def adaround(
    model: nn.Module,
    calib: Iterable[Any],
    *,
    names: Iterable[str] | None = None,
    iterations: int = ITERATIONS,
    rows: int = ROWS,
    drop: float = 0.0,
    progress: bool = True,
) -> dict[str, tuple[float, float]]:
    """Learn AdaRound codes for the weights of ``model``'s quantized ``Conv``/``Linear`` layers (all of them, or
    those in ``names``), in the order the model runs them, from calibration batches ``calib``. Returns, per layer
    rounded, its mean square output error per sampled position with plain rounding and with the learned codes.
    ``drop``: the probability that each input element is taken from the float model while learning (QDrop; 0:
    AdaRound's own objective, 0.5: QDrop's). Call it after calibration; the model runs in eval mode."""
    found = chosen_layers(model, names, "AdaRound")
    if not found:
        return {}
    if iterations < 1 or rows < 1:
        raise CalibrationError(f"AdaRound needs iterations >= 1 and rows >= 1, got {iterations} and {rows}")
    if not 0.0 <= drop <= 1.0:
        raise CalibrationError(f"AdaRound's drop must be a probability in [0, 1] (QDrop uses 0.5), got {drop!r}")
    batches = _batches(calib)
    errors: dict[str, tuple[float, float]] = {}
    with evaluating(model):
        order = run_order(model, found, batches[0])
        bar = tqdm(order, desc="AdaRound", unit="layer", disable=not progress, leave=False)
        for i, name in enumerate(bar):
            module = found[name]
            sample = Sample(module, max(1, -(-rows // len(batches))), i)
            patches, target, float_patches = _collect(model, name, module, sample, batches, keep_float=drop > 0)
            errors[name] = round_layer(
                module, patches, target, iterations=iterations, float_patches=float_patches, drop=drop
            )
    return errors
