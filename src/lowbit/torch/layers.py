"""Quantized layers: the torch layer with a :class:`TensorQuantizer` on its input and one on its weight.

Each ``Quant*`` class subclasses the float layer it replaces (so ``isinstance(m, nn.Conv2d)`` still holds) and is
built from it by :meth:`from_float`, which shares nothing with the original. :data:`MODULE_MAP` says which layer
becomes which; :func:`lowbit.torch.quantize` swaps modules with it explicitly, by name, in their parents.

Weights are quantized per output channel along the axis each layer stores it on (Conv: 0, ConvTranspose: 1,
Linear: 0; transformers' Conv1D, (in, out): 1), in groups along the input axis (1; ConvTranspose and Conv1D: 0) for
per-group configs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import SpecError
from lowbit.recipe import LayerConfig, QuantizerConfig
from lowbit.torch.config import on_default_grid
from lowbit.torch.quantizer import TensorQuantizer


def make_quantizer(cfg: QuantizerConfig | None, axis: int, name: str) -> TensorQuantizer:
    """The :class:`TensorQuantizer` of ``cfg`` for a tensor whose channel axis is ``axis`` (None: a disabled one,
    the tensor stays float)."""
    if cfg is None:
        q = TensorQuantizer(QuantizerConfig().spec(None), name=name)
        q.mode = "disabled"
        return q
    cfg = on_default_grid(cfg)
    return TensorQuantizer(
        cfg.spec(axis),
        method=cfg.method,
        method_options=cfg.method_options,
        dynamic=cfg.dynamic,
        learn_scale=cfg.learn_scale,
        name=name,
    )


class QuantMixin:
    """``input_quantizer`` and ``weight_quantizer`` on a layer with a ``weight``."""

    WEIGHT_AXIS = 0
    GROUP_AXIS = 1

    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer

    def _init_quantizers(self, cfg: LayerConfig, name: str) -> None:
        self.input_quantizer = make_quantizer(cfg.input, 1, f"{name}.input")
        w = cfg.weight
        if w is not None and w.dynamic:  # weights are constants: "dynamic" means nothing for them
            w = replace(w, dynamic=False)
        axis = self.GROUP_AXIS if w is not None and w.granularity == "group" else self.WEIGHT_AXIS
        self.weight_quantizer = make_quantizer(w, axis, f"{name}.weight")
        self.weight_quantizer.is_weight = True
        self.weight_float = w is None

    @classmethod
    def _hyper(cls, module: nn.Module) -> dict:
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }

    @classmethod
    def _new(cls, module: nn.Module):
        """An uninitialised layer shaped like ``module``, on its device and in its dtype."""
        return cls(**cls._hyper(module), device=module.weight.device, dtype=module.weight.dtype)

    @classmethod
    def from_float(cls, module: nn.Module, cfg: LayerConfig, name: str = ""):
        """A quantized copy of the float layer ``module`` (same weights, on the same device; quantizers
        uncalibrated)."""
        new = cls._new(module)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        new._init_quantizers(cfg, name)
        new.train(module.training)  # after the quantizers exist: they follow the layer's mode
        return new.to(module.weight.device)

    def calibrate_weight(self) -> None:
        """Fix the weight's scale from the weight itself (max |w| per channel or group): no data needed."""
        if self.weight_float:
            return
        self.weight_quantizer.calibrate_on(self._weight_to_quantize())

    def _weight_to_quantize(self) -> torch.Tensor:
        return self.weight

    def _bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias on the integer grid the layer's accumulator uses, ``round(b / (s_x * s_w)) * s_x * s_w`` (int32,
        straight-through gradient), as an integer kernel adds it: ONNX Runtime's QLinearConv and QGemm quantize a
        float bias so, which at 4 bits moves outputs by whole steps. Left float when there is no such grid (an input
        in float or dynamic, per-group weights)."""
        qi, qw = self.input_quantizer, self.weight_quantizer
        if (
            bias is None
            or qi.mode != "quantize"
            or qw.mode != "quantize"
            or qi.dynamic
            or not qi.calibrated
            or not qw.calibrated
            or qi.scale.numel() != 1
            or qw.spec.group_size is not None
            or qw.scale.numel() not in (1, bias.numel())
        ):
            return bias
        step = (qi.scale.reshape(()) * qw.scale.reshape(-1)).detach().clamp_min(1e-30)
        on_grid = torch.clamp(torch.round(bias / step), -(2**31), 2**31 - 1) * step
        if torch.onnx.is_in_onnx_export():
            return on_grid  # constants: export folds them into the bias initializer
        return bias + (on_grid - bias).detach()


class QuantConv1d(QuantMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self._bias(self.bias))


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self._bias(self.bias))


class QuantConv3d(QuantMixin, nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self._bias(self.bias))


class QuantConvTranspose2d(QuantMixin, nn.ConvTranspose2d):
    WEIGHT_AXIS = 1  # (in, out / groups, kH, kW)
    GROUP_AXIS = 0

    @classmethod
    def _hyper(cls, module: nn.Module) -> dict:
        return {**super()._hyper(module), "output_padding": module.output_padding}

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            self.input_quantizer(x),
            self.weight_quantizer(self.weight),
            self._bias(self.bias),
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


class QuantLinear(QuantMixin, nn.Linear):
    @classmethod
    def _hyper(cls, module: nn.Module) -> dict:
        return {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self._bias(self.bias))


class Add(nn.Module):
    """``a + b`` as a module, so that quantization can reach the inputs of an addition.

    ``quantize`` says which operands a quantized copy (:class:`QuantAdd`) quantizes. The default, the second,
    is TensorRT's rule for a residual ``out + skip``: with its skip input quantized, TensorRT runs the add inside
    the INT8 convolution that produces ``out``. Write ``self.add = lowbit.torch.Add()`` and ``self.add(out, x)``
    in a model, or let ``Config(residual_adds=True)`` find the ``x + y`` of ``forward`` (torch.fx) and insert them.
    """

    def __init__(self, quantize: tuple[bool, bool] = (False, True)):
        super().__init__()
        if len(quantize) != 2:
            raise ValueError(f"quantize says for each of the two operands whether to quantize it, got {quantize!r}")
        self.quantize = tuple(bool(v) for v in quantize)

    def extra_repr(self) -> str:
        which = [name for name, q in zip(("a", "b"), self.quantize, strict=True) if q]
        return f"quantize={'+'.join(which) or 'none'}"

    def forward(self, a, b):
        return a + b


class QuantAdd(Add):
    """``a + b`` with a :class:`TensorQuantizer` on each operand :attr:`Add.quantize` names (``input_quantizers``;
    the others are disabled). Operands that are not floating-point tensors (shape arithmetic) are added as they are,
    and the quantizers of such an add switch themselves off during calibration."""

    @classmethod
    def from_float(cls, module: Add, cfg: LayerConfig, name: str = "") -> QuantAdd:
        new = cls(module.quantize)
        new.input_quantizers = nn.ModuleList(
            make_quantizer(cfg.input if q else None, 1, f"{name}.input.{i}") for i, q in enumerate(module.quantize)
        )
        new.train(module.training)  # after the quantizers exist: they follow the layer's mode
        return new

    def calibrate_weight(self) -> None:  # no weight
        pass

    def forward(self, a, b):
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (a, b)):
            for q in self.input_quantizers:
                if q.mode == "calibrate":
                    q.mode = "disabled"
            return a + b
        qa, qb = self.input_quantizers
        return qa(a) + qb(b)


class QuantLSTM(nn.LSTM):
    """An ``nn.LSTM`` whose matrix products take quantized operands: every weight matrix (``weight_ih_l0``,
    ``weight_hh_l0``, ...) per output row (``weight_quantizers``), the input sequence (``input_quantizer``) and the
    hidden state of every step (``hidden_quantizer``). With the ``int8_dynamic`` preset the weights are quantized
    once and the input and hidden scales are computed from each batch at run time, as ONNX Runtime's
    DynamicQuantizeLSTM and PyTorch's dynamic LSTM do. The cell is the LSTM's:

        i, f, g, o = split(q(x_t) @ q(W_ih)^T + b_ih + q(h) @ q(W_hh)^T + b_hh)
        c = sigmoid(f) * c + sigmoid(i) * tanh(g);   h = sigmoid(o) * tanh(c)

    computed step by step in Python (slower than cuDNN's fused kernel: this is the quantized model's reference).
    """

    @classmethod
    def from_float(cls, module: nn.LSTM, cfg: LayerConfig, name: str = "") -> QuantLSTM:
        if module.proj_size:
            raise SpecError(f"{name or 'LSTM'}: an LSTM with proj_size has no quantized form here; leave it in float")
        new = cls(
            module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
            module.dropout, module.bidirectional, device=module.weight_ih_l0.device, dtype=module.weight_ih_l0.dtype,
        )  # fmt: skip
        new.load_state_dict(module.state_dict())
        new.input_quantizer = make_quantizer(cfg.input, 1, f"{name}.input")
        new.hidden_quantizer = make_quantizer(cfg.input, 1, f"{name}.hidden")
        w = cfg.weight
        if w is not None and (w.dynamic or w.granularity == "group"):
            w = replace(w, dynamic=False, granularity="channel", group_size=None)
        new.weight_float = w is None
        new.weight_quantizers = nn.ModuleDict()
        for pname, _ in module.named_parameters():
            if pname.startswith("weight_"):
                q = make_quantizer(w, 0, f"{name}.{pname}")
                q.is_weight = True
                new.weight_quantizers[pname] = q
        new.train(module.training)  # after the quantizers exist: they follow the layer's mode
        return new.to(module.weight_ih_l0.device)

    def calibrate_weight(self) -> None:
        if self.weight_float:
            return
        for pname, q in self.weight_quantizers.items():
            q.calibrate_on(getattr(self, pname))

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise SpecError("QuantLSTM takes padded tensors, not a PackedSequence")
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        seq, batch = x.shape[0], x.shape[1]
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            zeros = x.new_zeros(self.num_layers * dirs, batch, self.hidden_size)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        h0, c0 = hx
        hs, cs = [], []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                w_ih = self.weight_quantizers[f"weight_ih{suffix}"](getattr(self, f"weight_ih{suffix}"))
                w_hh = self.weight_quantizers[f"weight_hh{suffix}"](getattr(self, f"weight_hh{suffix}"))
                b_ih = getattr(self, f"bias_ih{suffix}") if self.bias else None
                b_hh = getattr(self, f"bias_hh{suffix}") if self.bias else None
                xi = F.linear(self.input_quantizer(layer_in), w_ih, b_ih)  # all steps at once
                h, c = h0[layer * dirs + d], c0[layer * dirs + d]
                steps = range(seq - 1, -1, -1) if d else range(seq)
                out = [None] * seq
                for t in steps:
                    gates = xi[t] + F.linear(self.hidden_quantizer(h), w_hh, b_hh)
                    i, f, g, o = gates.chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    out[t] = h
                outs.append(torch.stack(out))
                hs.append(h)
                cs.append(c)
            layer_in = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout)
        out, h_n, c_n = layer_in, torch.stack(hs), torch.stack(cs)
        if not batched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)


MODULE_MAP: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
    nn.LSTM: QuantLSTM,
    Add: QuantAdd,
}


def register(float_type: type[nn.Module]):
    """Class decorator: :func:`lowbit.torch.quantize` swaps every layer of type ``float_type`` for the decorated
    ``Quant*`` class (an entry of :data:`MODULE_MAP`), as layer types of optional packages do (transformers'
    ``Conv1D``: :mod:`lowbit.torch.hf`)."""

    def add(quant_type: type[nn.Module]) -> type[nn.Module]:
        MODULE_MAP[float_type] = quant_type
        return quant_type

    return add
