"""TensorQuantizer: the one module that quantizes a tensor in a PyTorch model.

Modes (:attr:`TensorQuantizer.mode`):
  - ``"calibrate"``: pass the tensor through unchanged and feed it to a lowbit calibrator;
  - ``"quantize"``: fake quantization, ``x -> (clamp(round(x / s) + z, qmin, qmax) - z) * s``, with the
    straight-through estimator: the gradient passes unchanged inside the range and is zero outside it;
  - ``"disabled"``: identity.

The scale can be learned (LSQ, Esser et al. 2020, "Learned Step Size Quantization"): written as above with
``round`` replaced by a straight-through round, the gradient of the output with respect to ``s`` is
``round(x / s) - x / s`` inside the range and ``qmin - z`` or ``qmax - z`` outside, LSQ's step-size gradient,
scaled by ``1 / sqrt(n * qmax)``. Rounding is half to even, as ONNX QuantizeLinear.

In training a quantizer looks, on its first step and then every :data:`CLIP_CHECK_EVERY` steps, at how much of its
input lies outside its range; above :data:`CLIP_WARN_FRACTION` it warns once (:class:`ClippingWarning`): the
gradient does not pass those values, and the layers before it stop learning.

>>> import torch
>>> from lowbit.core import QuantSpec
>>> q = TensorQuantizer(QuantSpec(bits=8))
>>> q.mode = "calibrate"; _ = q(torch.tensor([-1.0, 0.5, 2.0])); q.load_calibration()
>>> q(torch.tensor([0.3, 2.5]))   # scale 2/127; 2.5 saturates at 2.0
tensor([0.2992, 2.0000])
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit import calib
from lowbit.core import QuantSpec, fitted_qparams, layout, qparams, weight_range
from lowbit.core.formats import limits as grid_limits
from lowbit.errors import CalibrationError, SpecError
from lowbit.torch import formats, ranks
from lowbit.torch.formats.common import grad_scale
from lowbit.torch.formats.common import view as param_view

MODES = ("calibrate", "quantize", "disabled")
_MIN_SCALE = 1e-12
CLIP_WARN_FRACTION = 0.5  # a quantizer that clips more than this share of its input in training warns
CLIP_CHECK_EVERY = 16  # training steps between two looks (the first step is always looked at)


class ClippingWarning(UserWarning):
    """A quantizer clips most of its input in training: the straight-through gradient is zero for the clipped
    values, so little or nothing reaches the layers before it."""


def _ratio(calibrated: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """``calibrated / observed`` where ``observed`` is not 0 (and of the same sign), else 1."""
    usable = (observed != 0) & (calibrated * observed > 0)
    return torch.where(usable, calibrated / torch.where(usable, observed, torch.ones_like(observed)), 1.0)


def _round_ste(v: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """Round half to even (or ``floor(v + u)``, u ~ U[0, 1), when ``stochastic``) forward, identity backward."""
    rounded = torch.floor(v + torch.rand_like(v)) if stochastic else torch.round(v)
    return v + (rounded - v).detach()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with ``model`` in eval mode; it goes back to the mode it was in, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    grad_factor: float = 1.0,
    stochastic: bool = False,
) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale`` with straight-through rounding;
    ``scale`` and ``zero_point`` in :func:`~lowbit.core.layout.param_shape` (``grad_factor`` scales the gradient
    that reaches ``scale``, as LSQ does). ``stochastic``: round ``floor(x / scale + u)``, u ~ U[0, 1) (unbiased:
    its mean is ``x / scale``), drawn from torch's generator."""
    s = param_view(grad_scale(scale, grad_factor), x.shape, spec)
    z = param_view(zero_point, x.shape, spec).to(x.dtype)
    q = torch.clamp(_round_ste(x / s, stochastic) + z, spec.qmin, spec.qmax)
    return (q - z) * s


class _QDQ(torch.autograd.Function):
    """Fake quantization that the TorchScript ONNX exporter writes as QuantizeLinear + DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec: QuantSpec, clip_lo: float | None, clip_hi: float | None):
        return fake_quant(x, scale, zero_point, spec)

    @staticmethod
    def symbolic(g, x, scale, zero_point, spec: QuantSpec, clip_lo, clip_hi):
        if clip_lo is not None:  # fewer than 8 bits through an 8-bit Q/DQ: clip to the narrower grid first
            lo = g.op("Constant", value_t=torch.tensor(clip_lo, dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor(clip_hi, dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        attrs: dict[str, Any] = {}
        if spec.axis is not None:
            attrs["axis_i"] = spec.axis
        q = g.op("QuantizeLinear", x, scale, zero_point, **attrs)
        return g.op("DequantizeLinear", q, scale, zero_point, **attrs)


class TensorQuantizer(nn.Module):
    """Quantizes one tensor as ``spec`` says; see the module docstring for the modes.

    ``method`` and ``method_options`` pick the lowbit calibrator of a per-tensor activation range; a per-channel
    or per-group quantizer (weights) takes min/max per slice. ``dynamic`` computes the range of every batch at
    run time. ``learn_scale`` makes the scale an ``nn.Parameter`` (LSQ). ``observe_steps`` (QAT): for that many
    training steps after calibration, the range follows an exponential moving average of each batch's min/max
    (``momentum``), then it is frozen. ``follow_weight`` (off by default): in training a weight's range keeps the
    fraction of the weight's own range that calibration chose (:meth:`_follow_weight`). In training it warns once
    (:class:`ClippingWarning`) if it clips more than :data:`CLIP_WARN_FRACTION` of its input, looked at on the first
    step and every :data:`CLIP_CHECK_EVERY`.
    """

    def __init__(
        self,
        spec: QuantSpec,
        *,
        method: str = "minmax",
        method_options: dict[str, Any] | None = None,
        dynamic: bool = False,
        learn_scale: bool = False,
        name: str = "",
    ):
        super().__init__()
        if learn_scale and formats.scales_itself(spec):
            raise SpecError("learn_scale: binary and ternary weights take their scale from the weight at every step")
        if spec.group_size is not None and formats.scales_itself(spec):
            raise SpecError("binary and ternary weights are per channel or per tensor in lowbit.torch, not per group")
        self.spec = spec
        self.method, self.method_options = method, dict(method_options or {})
        self.dynamic, self.learn_scale, self.name = dynamic, learn_scale, name
        self.mode = "quantize" if dynamic else "calibrate"
        self.is_weight = False  # a constant: export clips it per channel and stores its integer codes
        # Opt-in: in training, a weight's range (unless learned) follows the weight: see _follow_weight.
        self.follow_weight = False
        self._weight_ratio: tuple[torch.Tensor, torch.Tensor] | None = None
        self.observe_steps = 0
        self.momentum = 0.1
        self.training_steps = 0  # forwards in training mode, quantized
        # Set by lowbit.torch.ddp: each rank sees a shard of the global batch, and ranges and LSQ count all of it
        self.data_parallel = False
        self.clip_warned = False
        self._calibrator: calib.Calibrator | None = None
        self._lo: np.ndarray | None = None  # per-slice running min/max of non-histogram calibration
        self._hi: np.ndarray | None = None
        self.register_buffer("zero_point", torch.zeros(0))  # float: it takes part in the float fake quantization
        # A weight's integer codes chosen by GPTQ (lowbit.torch.rounding) at the current scale; empty: nearest rounding
        self.register_buffer("codes", torch.zeros(0, dtype=torch.int32))
        # A learned power-of-two scale is learned as its exponent (LSQ on log2 s, rounded straight-through); the
        # scale buffer then holds 2^round(log2_scale), what evaluation and export use.
        self.learns_exponent = learn_scale and spec.scale_kind == "pow2"
        if learn_scale and not self.learns_exponent:
            self.scale = nn.Parameter(torch.zeros(0))
        else:
            self.register_buffer("scale", torch.zeros(0))
        if self.learns_exponent:
            self.log2_scale = nn.Parameter(torch.zeros(0))

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {value!r}")
        self._mode = value

    @property
    def calibrated(self) -> bool:
        """Whether the quantizer has a scale (a dynamic one never needs one)."""
        return self.dynamic or self.scale.numel() > 0

    def extra_repr(self) -> str:
        s = self.spec
        parts = [
            s.format if s.format != "int" else f"{s.bits}-bit",
            "signed" if s.signed else "unsigned",
            "symmetric" if s.symmetric else "asymmetric",
        ]
        parts.append(s.granularity if s.axis is not None else "per-tensor")
        if s.axis is not None:
            parts[-1] = f"per-{s.granularity} axis={s.axis}" + (f" group={s.group_size}" if s.group_size else "")
        parts += ["dynamic"] if self.dynamic else [self.method]
        if self.learn_scale:
            parts.append("learned scale")
        return f"{', '.join(parts)}, mode={self.mode}"

    def set_range(self, lo, hi) -> None:
        """Fix the scale and zero point from a real range (floats, or arrays of the parameter shape)."""
        self.set_qparams(*qparams(lo, hi, self.spec))

    def set_qparams(self, scale: np.ndarray, zp: np.ndarray) -> None:
        """Fix the scale and zero point (arrays of the parameter shape)."""
        device = self.scale.device
        self.clear_codes()  # they were chosen at the old scale
        with torch.no_grad():
            self.scale.data = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(np.shape(scale))
            self.zero_point.data = torch.as_tensor(zp.astype(np.float32), device=device).reshape(np.shape(zp))
            if self.learns_exponent:
                self.log2_scale.data = torch.log2(self.scale.data.clone())

    @property
    def has_codes(self) -> bool:
        """Whether the weight is rounded by chosen codes (GPTQ) rather than to nearest."""
        return self.codes.numel() > 0

    def set_codes(self, codes: torch.Tensor) -> None:
        """Use ``codes`` (integers in [qmin, qmax], the weight's shape) as this weight's quantized values at the
        current scale and zero point, instead of rounding it to nearest. Cleared when the scale changes
        (:meth:`set_range`) and by training, which changes the weight they were chosen for."""
        if not self.is_weight or not self.calibrated or self.dynamic:
            raise CalibrationError(f"{self._describe()}: only a calibrated weight quantizer takes codes")
        if self.spec.format != "int" or formats.scales_itself(self.spec):
            kind = "binary" if self.spec.format == "int" else repr(self.spec.format)
            raise CalibrationError(
                f"{self._describe()}: codes are integers on a calibrated grid; format {kind} rounds to nearest"
            )
        c = torch.as_tensor(codes)
        if bool(((c < self.spec.qmin) | (c > self.spec.qmax)).any()):
            raise CalibrationError(
                f"{self._describe()}: codes outside [{self.spec.qmin}, {self.spec.qmax}], the {self.spec.bits}-bit grid"
            )
        self.codes = c.to(device=self.scale.device, dtype=torch.int32)

    def clear_codes(self) -> None:
        """Back to rounding the weight to nearest."""
        self.codes = torch.zeros(0, dtype=torch.int32, device=self.codes.device)

    def calibrate_on(self, x: torch.Tensor) -> None:
        """Fix the scale from ``x`` alone (a weight: no data needed), and switch to ``"quantize"``. A quantizer
        whose method is ``admm`` (per tensor, channel or group) or ``mse`` (per channel or group) takes the range
        :func:`lowbit.core.weight_range` fits to each slice of ``x`` (``method_options``: admm's ``start``,
        ``percentile``, ``max_rounds``; mse's ``num_candidates``), the others min/max (or their calibrator). With
        power-of-two scales each slice of an integer format takes the power of two that fits ``x`` best
        (:func:`lowbit.core.fitted_qparams`; FP8 and log2 round theirs up). Binary and ternary weights have nothing
        to calibrate: their scale is the weight's own at every forward."""
        if self.scale.device != x.device:
            self.to(x.device)
        if self.is_weight and formats.scales_itself(self.spec):
            self.mode = "quantize"
            with torch.no_grad():
                self(x)
            return
        values = x.detach().float().cpu().numpy()
        if self.method == "admm" or (self.method == "mse" and self.spec.axis is not None):
            try:
                lo, hi = weight_range(values, self.spec, self.method, self.method_options)
            except SpecError as exc:
                raise CalibrationError(f"{self._describe()}: {exc}") from None
        else:
            self.mode = "calibrate"
            with torch.no_grad():
                self(x)
            lo, hi = self._calibrated_range()
        self.set_qparams(*fitted_qparams(values, lo, hi, self.spec))
        self._calibrator, self._lo, self._hi = None, None, None
        self.mode = "quantize"
        self._weight_ratio = None
        if self.is_weight:
            self._weight_ratio = self._clip_ratio(x.detach().float())

    def load_calibration(self) -> None:
        """Turn the statistics gathered in ``"calibrate"`` mode into the scale, and switch to ``"quantize"``."""
        self.set_range(*self._calibrated_range())
        self._calibrator, self._lo, self._hi = None, None, None
        self.mode = "quantize"

    def calibration_state(self) -> dict[str, Any] | None:
        """The statistics gathered so far in ``"calibrate"`` mode, as plain data (None: none yet): the calibrator's
        :meth:`~lowbit.calib.Calibrator.state_dict`, or the per-slice running min/max. Another process's
        quantizer folds them in with :meth:`merge_calibration_state` (:mod:`lowbit.torch.distributed`)."""
        if self._calibrator is not None:
            return {"calibrator": self._calibrator.state_dict()}
        if self._lo is not None:
            return {"lo": np.array(self._lo), "hi": np.array(self._hi)}
        return None

    def merge_calibration_state(self, state: dict[str, Any] | None) -> None:
        """Fold in the statistics ``state`` (:meth:`calibration_state` of a quantizer like this one, on other
        data): histograms add, minima and maxima take the min and max."""
        if state is None:
            return
        if "calibrator" in state:
            if self._calibrator is None:
                self._calibrator = self._new_calibrator()
                self._calibrator.load_state_dict(state["calibrator"])
            else:
                other = self._new_calibrator()
                other.load_state_dict(state["calibrator"])
                self._calibrator.merge(other)
            return
        lo, hi = np.asarray(state["lo"]), np.asarray(state["hi"])
        self._lo = lo if self._lo is None else np.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else np.maximum(self._hi, hi)

    def clear_calibration(self) -> None:
        """Forget the statistics gathered in ``"calibrate"`` mode (the scale stays as it is)."""
        self._calibrator, self._lo, self._hi = None, None, None

    def _new_calibrator(self) -> calib.Calibrator:
        options = calib.grid_options(self.method, self.spec, self.method_options)
        return calib.create(self.method, tensor=self.name or None, **options)

    def _calibrated_range(self):
        """The range ``(lo, hi)`` the statistics gathered in ``"calibrate"`` mode choose."""
        if self._calibrator is not None:
            if self._calibrator.num_batches == 0:
                raise CalibrationError(f"{self._describe()}: calibration saw no data")
            return self._calibrator.compute()
        if self._lo is not None:
            return self._lo, self._hi
        raise CalibrationError(
            f"{self._describe()}: no calibration data reached this quantizer; run the model on calibration "
            "batches in 'calibrate' mode first (lowbit.torch.quantize does), or check that the layer is used"
        )

    def _describe(self) -> str:
        return f"quantizer {self.name!r}" if self.name else "quantizer"

    def _slice_minmax(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return layout.reduce(x, self.spec, "min"), layout.reduce(x, self.spec, "max")

    def _observe(self, x: torch.Tensor) -> None:
        if self.scale.device != x.device:  # created on the CPU beside a layer on another device: follow the data
            self.to(x.device)
        a = x.detach().float().cpu().numpy()
        if self.spec.axis is None:
            if self._calibrator is None:
                self._calibrator = self._new_calibrator()
            self._calibrator.update(a)
            return
        lo, hi = self._slice_minmax(a)
        self._lo = lo if self._lo is None else np.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else np.maximum(self._hi, hi)

    def _follow(self, x: torch.Tensor) -> None:
        """One EMA step of the range towards this batch's min/max (QAT before the observers freeze)."""
        a = x.detach().float().cpu().numpy()
        lo, hi = self._slice_minmax(a)
        if self.data_parallel:  # under DDP (lowbit.torch.ddp): the global batch's
            lo, hi = ranks.global_minmax(lo, hi, x.device)
        m = self.momentum
        old_scale, old_zp = self.scale.detach().cpu().numpy(), self.zero_point.cpu().numpy()
        if self.spec.symmetric:
            top = grid_limits(self.spec)[1]
            amax = (1 - m) * old_scale * (top - old_zp) + m * np.maximum(np.abs(lo), np.abs(hi))
            self.set_range(-amax, amax)
            return
        old_lo = (self.spec.qmin - old_zp) * old_scale
        old_hi = (self.spec.qmax - old_zp) * old_scale
        self.set_range(np.minimum((1 - m) * old_lo + m * lo, 0), np.maximum((1 - m) * old_hi + m * hi, 0))

    def _weight_minmax(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slice min and max of a weight, on its device (per group: through NumPy)."""
        spec = self.spec
        if spec.axis is None:
            return w.amin(), w.amax()
        if spec.group_size is None:
            axis = layout.normalize_axis(spec.axis, w.dim())
            flat = w.movedim(axis, 0).reshape(w.shape[axis], -1)
            return flat.amin(1), flat.amax(1)
        lo, hi = self._slice_minmax(w.cpu().numpy())
        return torch.as_tensor(lo, device=w.device), torch.as_tensor(hi, device=w.device)

    def _follow_weight(self, x: torch.Tensor) -> None:
        """Keep a weight's range the same fraction of the weight's own per-slice min and max that calibration chose
        (1 for min/max, less for an MSE-clipped range), as training moves the weight (torch.ao's weight observers
        likewise follow the weight every step; ModelOpt keeps the calibrated range, as lowbit does by default).
        In benchmarks/qat_bn_bench.py (W4A4, 3 seeds, about 1.5 points of noise) following min/max ranges gave
        77.3% from converged BatchNorm statistics against 77.9% with the default (a fixed range clips the few
        weights that grow and keeps a fine grid for the rest), 78.0% against 76.9% from unconverged ones; following
        MSE-clipped ranges (weight ``method="mse"``) was best in both, 79.1% and 78.1%."""
        w = x.detach().float()
        if self._weight_ratio is None:  # set without calibrate_on (a loaded state dict): take the range as it is
            self._weight_ratio = self._clip_ratio(w)
        r_lo, r_hi = self._weight_ratio
        with torch.no_grad():
            w_lo, w_hi = self._signed_minmax(w)
            new_lo = (r_lo.to(w.device) * w_lo).cpu().numpy()
            new_hi = (r_hi.to(w.device) * w_hi).cpu().numpy()
        self.set_range(new_lo, new_hi)

    def _signed_minmax(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight's per-slice (min, max), or (-max|w|, max|w|) for a symmetric spec."""
        w_lo, w_hi = self._weight_minmax(w)
        if not self.spec.symmetric:
            return w_lo, w_hi
        w_amax = torch.maximum(w_lo.abs(), w_hi.abs())
        return -w_amax, w_amax

    def real_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real range ``(lo, hi)`` the scale and zero point stand for, in the parameter shape; for a symmetric
        spec ``(-amax, amax)``, the range :func:`lowbit.core.qparams` gives this scale from."""
        s, z = self.scale.detach(), self.zero_point
        qlo, qhi = grid_limits(self.spec)
        hi = (qhi - z) * s
        return (-hi if self.spec.symmetric else (qlo - z) * s), hi

    def _clip_ratio(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantizer's range (lo, hi) as fractions of ``w``'s per-slice min and max."""
        with torch.no_grad():
            (lo, hi), (w_lo, w_hi) = self.real_range(), self._signed_minmax(w)
            return _ratio(lo, w_lo), _ratio(hi, w_hi)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "disabled":
            return x
        if self.mode == "calibrate":
            self._observe(x)
            return x
        if self.dynamic:
            lo, hi = self._slice_minmax(x.detach().float().cpu().numpy())
            scale, zp = qparams(lo, hi, self.spec)
            s = torch.as_tensor(scale, device=x.device)
            z = torch.as_tensor(zp.astype(np.float32), device=x.device)
            return self._fake_quant(x, s, z, 1.0)
        if self.is_weight and formats.scales_itself(self.spec):
            return self._self_scaled(x)
        if not self.calibrated:
            raise CalibrationError(
                f"{self._describe()} has no scale yet: calibrate it (lowbit.torch.quantize with calib=...) "
                "before running the model quantized"
            )
        if self.has_codes:
            if self.training:  # QAT changes the weight (and a learned scale): the codes no longer fit it
                self.clear_codes()
            else:
                if self.codes.shape != x.shape:
                    raise CalibrationError(
                        f"{self._describe()}: its GPTQ codes are {tuple(self.codes.shape)} but the weight is "
                        f"{tuple(x.shape)}; clear them (clear_codes) or round the weights again (lowbit.torch.gptq)"
                    )
                z = param_view(self.zero_point, x.shape, self.spec)
                x = ((self.codes.to(x.dtype) - z) * param_view(self.scale, x.shape, self.spec)).detach()
        if self.training and self.is_weight and self.follow_weight and not self.learn_scale:
            self._follow_weight(x)
        elif self.training and self.observe_steps > 0:
            self._follow(x)
            self.observe_steps -= 1
        factor, scale = 1.0, self.scale
        if self.learns_exponent:  # LSQ on the exponent: s = 2^round(log2_scale), the rounding straight-through
            scale = torch.exp2(_round_ste(self.log2_scale))
            with torch.no_grad():
                self.scale.data = scale.detach().clone()
        elif self.learn_scale:  # a step of the optimizer may push a learned scale to zero or below
            scale = scale.clamp_min(_MIN_SCALE)
        if torch.onnx.is_in_onnx_export():
            return self._export(x)
        if self.learn_scale and self.training:
            # LSQ's gradient scale counts the values per scale; under DDP an activation's are the global batch's
            shards = ranks.world_size() if self.data_parallel and not self.is_weight else 1
            per_scale = x.numel() * shards / max(self.scale.numel(), 1)
            factor = 1.0 / math.sqrt(per_scale * max(grid_limits(self.spec)[1], 1))
        if self.training and not self.clip_warned and self.observe_steps == 0:  # a following range is not judged
            if self.training_steps % CLIP_CHECK_EVERY == 0:
                self._check_clipping(x, scale)
            self.training_steps += 1
        return self._fake_quant(x, scale, self.zero_point, factor)

    def _self_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Binary and ternary weights (:mod:`lowbit.torch.formats`): the scale is taken from the weight at every
        forward and kept in :attr:`scale`, where the layer's bias grid and the export read it."""
        fmt = formats.for_spec(self.spec)
        if torch.onnx.is_in_onnx_export():
            return fmt.export(x, self.scale, self.zero_point, self.spec)
        scale = fmt.tensor_scale(x, self.spec)
        with torch.no_grad():
            self.scale.data, self.zero_point.data = scale, torch.zeros_like(scale)
        return fmt.fake_quant(x, scale, self.zero_point, self.spec, 1.0)

    def _fake_quant(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, factor: float):
        """Fake quantization in this quantizer's number format (uniform integers here, others by
        :mod:`lowbit.torch.formats`)."""
        if self.spec.format != "int":
            return formats.get(self.spec.format).fake_quant(x, scale, zero_point, self.spec, factor)
        stochastic = self.training and self.spec.rounding == "stochastic"  # evaluation and export: nearest
        return fake_quant(x, scale, zero_point, self.spec, factor, stochastic)

    def _check_clipping(self, x: torch.Tensor, scale: torch.Tensor) -> None:
        """Warn (once) if more than :data:`CLIP_WARN_FRACTION` of ``x`` lies outside the grid."""
        spec = self.spec
        with torch.no_grad():
            s, z = param_view(scale.detach(), x.shape, spec), param_view(self.zero_point, x.shape, spec)
            codes = torch.round(x.detach() / s) + z
            qlo, qhi = grid_limits(spec)
            share = float(((codes < qlo) | (codes > qhi)).float().mean())
            if not share > CLIP_WARN_FRACTION:
                return
            lo, hi = float(((qlo - z) * s).min()), float(((qhi - z) * s).max())
            x_lo, x_hi = float(x.min()), float(x.max())
        self.clip_warned = True
        if self.is_weight:
            what = "weight"
            advice = (
                "The gradient stops at clipped weights, so they stop learning. The (folded) weight outgrew the range "
                "fixed when it was quantized: let the range follow the weight (this quantizer's follow_weight = "
                "True), learn the weight scales (Config.with_learned_scales()) or fix them again from the weight "
                "(the layer's calibrate_weight())"
            )
        else:
            what = "batch"
            advice = (
                "The gradient stops at clipped values, so the layers before it barely train. Calibrate on "
                "training's activations: lowbit.torch.calibrate(model, batches, bn_stats='batch') "
                "(lowbit.torch.quantize(..., qat=True) does by default), or let the range follow the data for a few "
                "steps (observe_steps)"
            )
        warnings.warn(
            f"{self._describe()} clips {share:.0%} of its input in training: its range is [{lo:.3g}, {hi:.3g}], the "
            f"{what} spans [{x_lo:.3g}, {x_hi:.3g}]. {advice}",
            ClippingWarning,
            stacklevel=2,
        )

    def _export(self, x: torch.Tensor) -> torch.Tensor:
        """The traced form: QuantizeLinear + DequantizeLinear in the 8-bit storage type, after clipping ``x`` to
        the grid of a narrower spec (fewer bits, or narrow range) so that ONNX computes what ``fake_quant`` does."""
        spec = self.spec
        if bool((self.scale <= 0).any()):
            raise CalibrationError(
                f"{self._describe()}: a learned scale reached {float(self.scale.min()):.3g}; ONNX needs positive "
                "scales. Lower the learning rate of the scales, or recalibrate this quantizer"
            )
        if spec.format != "int":
            return formats.get(spec.format).export(x, self.scale, self.zero_point, spec)
        storage = (-128, 127) if spec.signed else (0, 255)
        clip: tuple[float | None, float | None] = (None, None)
        if (spec.qmin, spec.qmax) != storage:
            if self.is_weight:  # per channel: Min/Max of constants, which export folds into the integer weight
                s, z = self.scale.detach(), self.zero_point.detach()
                lo = param_view((spec.qmin - z) * s, x.shape, spec)
                hi = param_view((spec.qmax - z) * s, x.shape, spec)
                x = torch.minimum(torch.maximum(x, lo), hi)
            else:
                if self.scale.numel() != 1:
                    raise CalibrationError(
                        f"{self._describe()}: a per-channel activation quantizer narrower than int8 has no ONNX "
                        "form; use per-tensor for activations"
                    )
                s, z = float(self.scale.detach().reshape(())), float(self.zero_point.reshape(()))
                clip = (spec.qmin - z) * s, (spec.qmax - z) * s
        zp = self.zero_point.to(torch.int8 if spec.signed else torch.uint8)
        return _QDQ.apply(x, self.scale, zp, spec, *clip)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The scale's shape is only known after calibration: take the saved one.
        saved_exponent = state_dict.get(prefix + "log2_scale")
        if self.learns_exponent and saved_exponent is None and prefix + "scale" in state_dict:
            state_dict[prefix + "log2_scale"] = torch.log2(state_dict[prefix + "scale"])  # from a float-scale model
        elif not self.learns_exponent and saved_exponent is not None:
            del state_dict[prefix + "log2_scale"]  # a learned power of two into a fixed one: its scale says it all
        for key in ("scale", "zero_point", "codes", "log2_scale"):
            if prefix + key in state_dict and hasattr(self, key):
                getattr(self, key).data = torch.empty_like(state_dict[prefix + key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
