"""Per-input-channel smoothing of a quantized PyTorch model's Linear layers: ``y = (x / s) (W * s)^T``, the
machinery under AWQ (:mod:`lowbit.torch.rounding.awq`) and SmoothQuant (:func:`smoothquant`); the scales
themselves are chosen by :mod:`lowbit.core.smoothing`.

1. **Groups** (:func:`input_groups`): the Linear layers that read the very same tensor (q, k and v after a
   LayerNorm) share one ``s``. Found in one float forward pass by tensor identity (forward pre-hooks), with the
   module that produced that tensor (forward hooks) and how many torch operations read it (a
   ``TorchFunctionMode`` that counts every operation's tensor arguments; reading a shape does not count).
2. **Statistics** (:func:`gather`): per group, :class:`~lowbit.core.smoothing.ChannelStats` of the input (mean and
   max |x| per column) and a bounded, seeded, uniform sample of its rows (:class:`RowSample`) for the searches.
3. **Applying** ``s`` (:func:`apply_scales`): the weights of the group times ``s`` (columns), and ``1 / s`` folded
   into the producer when the tensor comes straight from a ``LayerNorm``/``RMSNorm`` (its weight and bias) or a
   ``Linear`` (its output rows and bias) and nothing but the group reads it; otherwise each layer of the group is
   swapped, by name, for a :class:`SmoothedLinear` that multiplies its input by ``1 / s`` (a ``Mul`` in ONNX). The
   float model computes the same function either way; the weight quantizers of every changed layer are fitted
   again to their new weights.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lowbit.core.formats import scales_itself
from lowbit.core.smoothing import ChannelStats, columns_amax, search_alpha, smooth_scales
from lowbit.errors import CalibrationError
from lowbit.torch.blockwise import Data, in_blocks
from lowbit.torch.fold import set_submodule
from lowbit.torch.layers import QuantLinear
from lowbit.torch.quantizer import TensorQuantizer, evaluating
from lowbit.torch.runner import run_data

ROWS = 512  # input rows sampled per group for the searches (AWQ, SmoothQuant's alpha search)
SEED = 0
NORMS = (nn.LayerNorm, nn.RMSNorm)


class SmoothedLinear(QuantLinear):
    """A :class:`~lowbit.torch.layers.QuantLinear` whose input is first multiplied per column by the buffer
    ``input_scale`` (``1 / s``), for smoothing scales that could not be folded into the op before it:
    ``y = q_w(W) q_x(x * input_scale)^T + b``. Exported as a ``Mul`` before the input's Q/DQ."""

    @classmethod
    def wrapping(cls, layer: QuantLinear) -> SmoothedLinear:
        """``layer`` (its parameters and quantizers, shared, not copied) with ``input_scale`` 1."""
        w = layer.weight
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device=w.device, dtype=w.dtype)
        new.weight, new.bias = layer.weight, layer.bias
        new.input_quantizer, new.weight_quantizer = layer.input_quantizer, layer.weight_quantizer
        new.weight_float = layer.weight_float
        new.register_buffer("input_scale", torch.ones(layer.in_features, device=w.device, dtype=w.dtype))
        new.train(layer.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x * self.input_scale)
        return F.linear(x, self.weight_quantizer(self.weight), self._bias(self.bias))


def smoothable(module: nn.Module, *, static_input: bool = False) -> bool:
    """A QuantLinear with a calibrated, static, integer weight quantizer (and, ``static_input``, a static input
    quantizer that is on): a layer whose input columns can be scaled."""
    if not isinstance(module, QuantLinear):
        return False
    q = module.weight_quantizer
    if q.spec.format != "int" or scales_itself(q.spec) or q.dynamic or q.mode != "quantize" or not q.calibrated:
        return False
    return not static_input or (module.input_quantizer.mode != "disabled" and not module.input_quantizer.dynamic)


def warn_unsmoothed(model: nn.Module, what: str) -> None:
    """Warn about the layers with a 2-D weight that are not Linear layers (transformers' Conv1D, GPT-2's): their
    inputs are not scaled by ``what`` (AWQ, SmoothQuant), which is silently weaker on such models otherwise."""
    skipped = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
               if hasattr(m, "weight_quantizer") and not isinstance(m, QuantLinear)
               and getattr(m, "weight", None) is not None and m.weight.dim() == 2]  # fmt: skip
    if skipped:
        warnings.warn(
            f"{what} scales the inputs of nn.Linear layers only; {len(skipped)} other layer(s) with a 2-D weight keep "
            f"plain rounding: {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}",
            stacklevel=3,
        )


@dataclass
class Group:
    """Layers reading one tensor (names in the model, the modules), and the module that wrote the tensor when
    ``1 / s`` can be folded into it (None: keep the scaling in the layers)."""

    names: list[str]
    layers: list[nn.Module]
    producer: nn.Module | None = None


class _Uses(TorchFunctionMode):
    """Counts, per tensor id, the torch operations that take the tensor (shape reads left out)."""

    def __init__(self):
        super().__init__()
        self.count: Counter[int] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in ("__get__", "size", "dim"):
            for t in _tensors((args, kwargs)):
                self.count[id(t)] += 1
        return func(*args, **kwargs)


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _foldable(module: nn.Module) -> bool:
    if isinstance(module, NORMS):
        return module.weight is not None
    return isinstance(module, nn.Linear) and type(module) in (nn.Linear, QuantLinear, SmoothedLinear)


class _Seen:
    """A tensor met in the wiring pass, followed by a weak reference (the pass keeps no activation alive): the
    layers that read it, the module that wrote it, and how many operations read it (taken when it dies, before
    its id can be reused)."""

    def __init__(self, t: torch.Tensor, uses: _Uses):
        self.ref = weakref.ref(t)
        self.names: list[str] = []
        self.producer: nn.Module | None = None
        self.final_uses: int | None = None
        self.finalizer = weakref.finalize(t, self._died, id(t), uses)
        self.finalizer.atexit = False

    def _died(self, tid: int, uses: _Uses) -> None:
        self.final_uses = uses.count[tid]

    def uses(self, uses: _Uses) -> int:
        t = self.ref()
        return self.final_uses if t is None else uses.count[id(t)]


def input_groups(model: nn.Module, layers: dict[str, nn.Module], run_first: Callable[[], None]) -> list[Group]:
    """The groups of ``layers`` (by name) that read one tensor, in the order they first run, each with its
    producer when ``1 / s`` can be folded there (see the module doc); ``run_first`` runs one float forward."""
    uses = _Uses()
    table: dict[int, _Seen] = {}
    order: list[_Seen] = []

    def seen(t: torch.Tensor) -> _Seen:
        e = table.get(id(t))
        if e is None or e.ref() is not t:  # first met, or a new tensor where a dead one was
            e = table[id(t)] = _Seen(t, uses)
            order.append(e)
        return e

    def on_input(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                e = seen(args[0])
                if name not in e.names:
                    e.names.append(name)

        return hook

    def on_output(module, args, out):
        if isinstance(out, torch.Tensor):
            seen(out).producer = module
            uses.count[id(out)] = 0  # from here on: an earlier tensor may have had this id

    handles = [m.register_forward_pre_hook(on_input(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(on_output) for m in model.modules() if _foldable(m)]
    try:
        with uses:
            run_first()
    finally:
        for h in handles:
            h.remove()
    groups: list[Group] = []
    for e in order:
        e.finalizer.detach()
        names = e.names
        if not names or any(names[0] in g.names for g in groups):  # a layer run twice: its first input only
            continue
        producer = e.producer if e.producer is not None and e.uses(uses) == len(names) else None
        groups.append(Group(names, [layers[n] for n in names], producer))
    return groups


class RowSample:
    """A uniform random sample of at most ``limit`` rows from a stream of row batches, seeded: every row gets a
    random key and the ``limit`` smallest keys are kept (memory: ``limit`` rows, whatever the data)."""

    def __init__(self, limit: int, seed: int = SEED):
        self.limit = limit
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        if self.limit <= 0:
            return
        rows = rows.detach().float().cpu()
        keys = torch.rand(rows.shape[0], generator=self.generator)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.limit:
            keys, idx = torch.topk(keys, self.limit, largest=False)
            rows = rows[idx]
        self.rows, self.keys = rows, keys

    @property
    def value(self) -> np.ndarray:
        """The sampled rows (n, columns), float64."""
        if self.rows is None:
            raise CalibrationError("no input rows were seen")
        return self.rows.double().numpy()


@dataclass
class Statistics:
    stats: ChannelStats
    sample: RowSample


def gather(groups: Sequence[Group], data: Data, rows: int = ROWS, seed: int = SEED) -> list[Statistics]:
    """Each group's input statistics over ``data.run()``: per-column mean and max |x| and (``rows`` > 0) a sample
    of at most ``rows`` input rows."""
    out = [Statistics(ChannelStats(), RowSample(rows, seed + i)) for i in range(len(groups))]

    def hook(st: Statistics):
        def take(module, args):
            x = args[0].detach().float()
            r = x.reshape(-1, x.shape[-1])
            a = r.abs()
            st.stats.add(a.sum(0).double().cpu().numpy(), a.amax(0).double().cpu().numpy(), r.shape[0])
            st.sample.update(r)

        return take

    handles = [g.layers[0].register_forward_pre_hook(hook(st)) for g, st in zip(groups, out, strict=True)]
    try:
        data.run()
    finally:
        for h in handles:
            h.remove()
    return out


def fresh(q: TensorQuantizer) -> TensorQuantizer:
    """An uncalibrated quantizer like ``q`` (spec, method and its options, weight or not), on the CPU: a probe to
    fit to other values (cheaper than a deep copy, which would also copy the calibration state)."""
    probe = TensorQuantizer(q.spec, method=q.method, method_options=q.method_options, name=q.name)
    probe.is_weight = q.is_weight
    return probe


def weight_fake_quant(q: TensorQuantizer) -> Callable[[np.ndarray], np.ndarray]:
    """``w -> `` ``w`` quantized as the weight quantizer ``q`` would quantize it, its range fitted to ``w`` itself
    (same spec, method, granularity, bits): the quantization a smoothed weight will get."""

    def quantize(w: np.ndarray) -> np.ndarray:
        probe = fresh(q)
        t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        probe.calibrate_on(t)
        with torch.no_grad():
            return probe(t).numpy()

    return quantize


def input_fake_quant(q: TensorQuantizer) -> Callable[[np.ndarray], np.ndarray]:
    """``x ->`` ``x`` quantized by a copy of the input quantizer ``q`` calibrated on ``x`` itself (its method)."""

    def quantize(x: np.ndarray) -> np.ndarray:
        probe = fresh(q)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        probe.mode = "calibrate"
        with torch.no_grad():
            probe(t)
            probe.load_calibration()
            return probe(t).numpy()

    return quantize


class PerMatrix:
    """One quantization function per matrix of a group, called in turn: the core searches call
    ``quantize_weight`` once per matrix, in the order of ``weights``; each call checks the shape it expects."""

    def __init__(self, layers: Sequence[nn.Module]):
        self.fns = [weight_fake_quant(m.weight_quantizer) for m in layers]
        self.shapes = [tuple(m.weight.shape) for m in layers]
        self.i = 0

    def __call__(self, w: np.ndarray) -> np.ndarray:
        i, self.i = self.i, (self.i + 1) % len(self.fns)
        if tuple(w.shape) != self.shapes[i]:
            raise RuntimeError(f"quantize_weight called out of order: {w.shape} for a weight of {self.shapes[i]}")
        return self.fns[i](w)


def weights(group: Group) -> list[np.ndarray]:
    """The group's current float weights as float64 arrays (rows, columns)."""
    return [m.weight.detach().double().cpu().numpy() for m in group.layers]


def apply_scales(model: nn.Module, group: Group, s: np.ndarray) -> None:
    """``x / s`` and ``W * s`` for the group (see the module doc); the weight quantizers of the changed layers
    are fitted again. The float model's function does not change."""
    layer0 = group.layers[0]
    st = torch.as_tensor(s, dtype=layer0.weight.dtype, device=layer0.weight.device)
    with torch.no_grad():
        for m in group.layers:
            m.weight.mul_(st)
        p = group.producer
        if isinstance(p, NORMS):
            p.weight.div_(st)
            if getattr(p, "bias", None) is not None:
                p.bias.div_(st)
        elif p is not None:
            p.weight.div_(st[:, None])
            if p.bias is not None:
                p.bias.div_(st)
            if isinstance(p, QuantLinear):
                p.calibrate_weight()
        else:
            for i, (name, m) in enumerate(zip(group.names, group.layers, strict=True)):
                if not isinstance(m, SmoothedLinear):
                    m = SmoothedLinear.wrapping(m)
                    set_submodule(model, name, m)
                    group.layers[i] = m
                m.input_scale.div_(st)
    for m in group.layers:
        m.calibrate_weight()


def recalibrate_inputs(model: nn.Module, calib: Any, layers: Sequence[nn.Module], progress: bool) -> None:
    """Calibrate again the static input quantizers of ``layers`` (their inputs were scaled) as calibration did
    the first time: every other activation quantizer passing its input through in float, the weights quantized."""
    qs = [m.input_quantizer for m in layers if m.input_quantizer.mode == "quantize" and not m.input_quantizer.dynamic]
    if not qs:
        return
    others = [q for q in model.modules() if isinstance(q, TensorQuantizer) and not q.is_weight and q not in qs]
    saved = [(q, q.mode) for q in others]
    try:
        for q in others:
            q.mode = "disabled"
        for q in qs:
            q.mode = "calibrate"
        with evaluating(model), torch.no_grad():
            run_data(model, calib, "calibrating smoothed inputs", progress)
    finally:
        for q, mode in saved:
            q.mode = mode
    for q in qs:
        q.load_calibration()


def smoothquant(
    model: nn.Module,
    calib: Any,
    alpha: float | str = 0.5,
    *,
    blocks: Sequence[str] | bool | None = None,
    rows: int = ROWS,
    progress: bool = True,
) -> dict[str, float]:
    """SmoothQuant (Xiao et al. 2022) on ``model``'s quantized Linear layers with static inputs, before their
    input ranges are calibrated: per group, ``s = smooth_scales(max|X|, max|W|, alpha)``
    (:func:`lowbit.core.smoothing.smooth_scales`), or with ``alpha="search"`` the alpha of least output error on a
    sample of ``rows`` input rows with the layers' own input and weight quantizers
    (:func:`lowbit.core.smoothing.search_alpha`), applied by :func:`apply_scales`. Block by block where the model
    has repeated blocks (``blocks``: :func:`lowbit.torch.blockwise.in_blocks`; the float function does not change,
    so each block's inputs are those of the float model). Returns the alpha used per group, by its first layer."""
    layers = {n: m for n, m in model.named_modules() if smoothable(m, static_input=True)}
    warn_unsmoothed(model, "SmoothQuant")
    used: dict[str, float] = {}

    def process(part: dict[str, nn.Module], data: Data) -> list[str]:
        groups = input_groups(model, part, data.run_first)
        found = gather(groups, data, rows if alpha == "search" else 0)
        for g, st in zip(groups, found, strict=True):
            if alpha == "search":
                iq = input_fake_quant(g.layers[0].input_quantizer)
                result = search_alpha(weights(g), st.sample.value, PerMatrix(g.layers), iq, st.stats.amax)
                s, used[g.names[0]] = result.scales, result.exponent
            else:
                s = smooth_scales(st.stats.amax, columns_amax(weights(g)), float(alpha))
                used[g.names[0]] = float(alpha)
            if not np.all(s == 1):  # the search found nothing better than no smoothing: no Mul to add
                apply_scales(model, g, s)
        return [n for g in groups for n in g.names]

    in_blocks(
        model, calib, layers, process, blocks=blocks, quantized_inputs=False, desc="SmoothQuant", progress=progress
    )
    return used
