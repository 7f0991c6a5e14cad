"""Hugging Face ``transformers`` models in :mod:`lowbit.torch` (``pip install "lowbit[hf]"``): what quantizing and
exporting them needs beyond plain PyTorch layers.

    from transformers import BertModel
    import lowbit.torch as lt
    from lowbit.torch import hf

    model = BertModel.from_pretrained("path/to/folder")                   # local files: nothing is downloaded
    qmodel = lt.quantize(model, replace(lt.preset("int8"), attention_matmuls=True), calib=batches)
    hf.export_onnx(qmodel, {"input_ids": ids, "attention_mask": mask}, "bert_int8.onnx")

- GPT-2's ``Conv1D`` (``y = x @ W + b``, W stored (in, out)) becomes :class:`QuantHFConv1D`, quantized as a Linear
  would be: per output channel (W's last axis), per group along its input axis (W's first). It is registered in
  :data:`lowbit.torch.layers.MODULE_MAP` when this module is imported, which :func:`lowbit.torch.quantize` does by
  itself for a model built from transformers' classes (importing transformers costs seconds, so lowbit.torch does not
  import it otherwise).
- ``Config(attention_matmuls=True)``: :func:`quantize_attention` gives each attention module an
  :class:`~lowbit.torch.attention.AttentionQuantizers` child and switches the model to the attention function
  :func:`~lowbit.torch.attention.quantized_attention`, registered with transformers' own extension point
  (``AttentionInterface``) as :data:`IMPLEMENTATION`, with eager attention's additive masks
  (``AttentionMaskInterface``). The attention modules are those the model's classes declare as recording attentions.
- Export: :class:`TensorOutputs` runs the model on tensors and returns one tensor (the ONNX exporter wants no
  ``ModelOutput``, no cache); :func:`export_onnx` writes it with :func:`lowbit.torch.export_onnx`, batch and sequence
  axes dynamic.

Tied embeddings: the quantized LM head gets its own copy of the tied weight, so the embedding table stays float and
unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import SpecError
from lowbit.recipe import Config
from lowbit.torch.attention import ATTRIBUTE, AttentionQuantizers, quantized_attention
from lowbit.torch.config import RECIPE_ATTRIBUTE
from lowbit.torch.export import export_onnx as export_quantized
from lowbit.torch.layers import QuantMixin, register

try:
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.pytorch_utils import Conv1D
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('lowbit.torch.hf needs transformers: pip install "lowbit[hf]"') from exc

IMPLEMENTATION = "lowbit"  # the attn_implementation name of quantized_attention
AttentionInterface.register(IMPLEMENTATION, quantized_attention)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


@register(Conv1D)
class QuantHFConv1D(QuantMixin, Conv1D):
    """transformers' ``Conv1D`` (GPT-2) with quantized input and weight: ``y = q(x) @ q(W) + b``, W (in, out)
    quantized per output channel along axis 1, or in groups along its input axis 0."""

    WEIGHT_AXIS = 1
    GROUP_AXIS = 0
    __repr__ = nn.Module.__repr__  # Conv1D's own shows neither quantizer

    @classmethod
    def _new(cls, module: nn.Module):
        return cls(module.nf, module.nx).to(device=module.weight.device, dtype=module.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.nf)
        x = self.input_quantizer(x)
        y = torch.addmm(self._bias(self.bias), x.reshape(-1, x.shape[-1]), self.weight_quantizer(self.weight))
        return y.reshape(shape)


def _attention_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes that transformers' pretrained classes in ``model`` declare as computing attention (the targets
    of their ``attentions`` / ``cross_attentions`` output recorders)."""
    classes: set[type] = set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            for key, recorder in (getattr(m, "_can_record_outputs", None) or {}).items():
                target = getattr(recorder, "target_class", recorder)
                if key.endswith("attentions") and isinstance(target, type):
                    classes.add(target)
    return tuple(classes)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules of a transformers ``model`` (those calling its attention function), by name."""
    classes = _attention_classes(model)
    return {name: m for name, m in model.named_modules() if classes and isinstance(m, classes)}


def quantize_attention(model: nn.Module, config: Config) -> list[str]:
    """Quantize the matmul inputs of every attention module of ``model`` whose name has an input config in
    ``config`` (:func:`lowbit.torch.attention.quantized_attention`); returns their names. The quantizers are
    uncalibrated; the model's attention implementation becomes :data:`IMPLEMENTATION`."""
    modules = attention_modules(model)
    pretrained = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    if not modules or not pretrained:
        raise SpecError(
            "attention_matmuls: the model has no transformers attention module lowbit can reach (it quantizes "
            "the attention of transformers models whose classes use its AttentionInterface); set it to False"
        )
    done = []
    for name, module in modules.items():
        layer = config.for_layer(name)
        if layer is not None and layer.input is not None:
            module.add_module(ATTRIBUTE, AttentionQuantizers(layer.input, name).to(_device(module)))
            done.append(name)
    for m in pretrained:
        if m.config._attn_implementation != IMPLEMENTATION:
            m.set_attn_implementation(IMPLEMENTATION)
        if m.config._attn_implementation != IMPLEMENTATION:  # transformers warned: the model cannot switch
            raise SpecError(
                f"attention_matmuls: {type(m).__name__} cannot change its attention implementation "
                "(set_attn_implementation); set attention_matmuls to False"
            )
    return done


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


class TensorOutputs(nn.Module):
    """``model`` (a transformers model) as the ONNX exporter takes it: ``forward(input_ids, attention_mask=None)``
    returns one tensor, ``output`` of the model's output (default: ``logits`` when it has them, else
    ``last_hidden_state``), with no key/value cache. A missing ``attention_mask`` is all ones (then transformers
    does not look for packed sequences, a search with no ONNX form). It carries the model's recorded recipe."""

    def __init__(self, model: nn.Module, output: str | None = None):
        super().__init__()
        self.model, self.output = model, output
        if hasattr(model, RECIPE_ATTRIBUTE):
            setattr(self, RECIPE_ATTRIBUTE, getattr(model, RECIPE_ATTRIBUTE))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"use_cache": False} if getattr(self.model.config, "use_cache", None) is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        return out[self.output_name(out)]

    def output_name(self, out) -> str:
        """The name of the output taken from the model's ``out``."""
        name = self.output or ("logits" if "logits" in out else "last_hidden_state")
        if name not in out:
            raise SpecError(f"output {name!r}: the model's outputs are {', '.join(out.keys())}")
        return name


def export_onnx(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    output: str | None = None,
    opset: int | None = None,
) -> Path:
    """Write a quantized transformers ``model`` as Q/DQ ONNX (:func:`lowbit.torch.export_onnx` on
    :class:`TensorOutputs`): ``inputs`` gives ``input_ids`` and optionally ``attention_mask`` (int64 (batch,
    sequence)), the inputs of the ONNX model under those names; its one output is named ``output`` (default:
    ``logits`` or ``last_hidden_state``). Batch and sequence axes are dynamic."""
    unknown = [k for k in inputs if k not in ("input_ids", "attention_mask")]
    if "input_ids" not in inputs or unknown:
        raise SpecError(f"inputs: give input_ids and optionally attention_mask, got {', '.join(inputs) or 'none'}")
    names = [k for k in ("input_ids", "attention_mask") if k in inputs]
    wrapper = TensorOutputs(model, output).eval()
    with torch.no_grad():
        name = wrapper.output_name(model(**{k: inputs[k][:1] for k in names}, return_dict=True))
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, name]}
    example = tuple(inputs[n] for n in names)
    return export_quantized(wrapper, example, path, opset=opset, input_names=names, output_names=[name],
                            dynamic_axes=axes)  # fmt: skip
