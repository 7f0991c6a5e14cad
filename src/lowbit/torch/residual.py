"""Find the residual additions a model writes as ``x + y`` in ``forward`` and make them :class:`Add` modules, so
that quantization can reach their skip input (TensorRT's rule for residual networks).

The model is traced with ``torch.fx``; every addition of two computed tensors (``x + y``, ``torch.add(x, y)``,
``x += y``; not a constant, a parameter or a number computed from shapes) becomes a call of an :class:`Add`
module placed in the module whose ``forward`` wrote it (``layer1.0.add``, ``layer1.0.add_1``, ...).
Which operand is the skip input:

  - ``x + f(x)``: the operand the other one was computed from (the block's input);
  - two independent branches (a ResNet block with a downsampling shortcut): the operand that is not the output of
    a convolution (or its BatchNorm), and if both are, the second one (``out + identity``, as written by most
    models and as NVIDIA's pytorch-quantization places it);
  - neither comes from a convolution: both are quantized, so that TensorRT can run the add in INT8.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from lowbit.errors import SpecError
from lowbit.torch.layers import Add, QuantMixin
from lowbit.torch.quantizer import TensorQuantizer

_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, operator.add, operator.iadd}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PASS_THROUGH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity)
_NUMBER_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist"}
_NUMBER_OPS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, len}


def _is_number(node: fx.Node) -> bool:
    """Whether ``node`` is (most likely) a Python number computed from shapes rather than a tensor."""
    if node.op == "call_method" and node.target in _NUMBER_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    if node.op == "call_function" and node.target in _NUMBER_OPS:
        return all(_is_number(a) for a in node.all_input_nodes)  # a tensor times a number is a tensor
    return False


def _is_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not is_add or len(node.args) != 2 or node.kwargs:
        return False  # alpha= or out=: leave such an addition alone
    return all(isinstance(a, fx.Node) and a.op != "get_attr" and not _is_number(a) for a in node.args)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _from_conv(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is the output of a convolution, possibly through a BatchNorm (or its folded Identity)."""
    while (
        node.op == "call_module"
        and isinstance(modules.get(node.target), _PASS_THROUGH)
        and node.args
        and isinstance(node.args[0], fx.Node)
    ):
        node = node.args[0]
    return node.op == "call_module" and isinstance(modules.get(node.target), _CONV_TYPES)


def skip_operands(a: fx.Node, b: fx.Node, modules: dict[str, nn.Module]) -> tuple[bool, bool]:
    """Which operands of ``a + b`` to quantize (see the module docstring)."""
    if a in _ancestors(b):
        return True, False
    if b in _ancestors(a):
        return False, True
    conv_a, conv_b = _from_conv(a, modules), _from_conv(b, modules)
    if conv_a and not conv_b:
        return False, True
    if conv_b and not conv_a:
        return True, False
    if conv_a and conv_b:
        return False, True
    return True, True


class _Tracer(fx.Tracer):
    """torch.fx's tracer that also keeps lowbit's own layers whole (their forward is not traceable)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantMixin, TensorQuantizer, Add)) or super().is_leaf_module(m, qualname)


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.keys()), "") if stack else ""


def trace_residual_adds(model: nn.Module) -> fx.GraphModule:
    """``model`` traced by torch.fx with every addition of two computed tensors replaced by an :class:`Add`
    module (named ``<module>.add``, ``<module>.add_1``, ... after the module whose forward wrote it). The result
    shares its parameters and submodules with ``model``; its class is ``torch.fx.GraphModule``."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as exc:  # data-dependent control flow, unsupported Python in forward, ...
        raise SpecError(
            f"torch.fx could not trace {type(model).__name__}.forward to find its residual additions "
            f"({type(exc).__name__}: {exc}). Write them as lowbit.torch.Add modules in the model instead "
            "(self.add = Add(); self.add(out, x)), or leave residual_adds off"
        ) from exc
    modules = dict(gm.named_modules())
    taken = set(modules)
    for node in list(gm.graph.nodes):
        if not _is_add(node):
            continue
        owner = _owner(node)
        base = f"{owner}.add" if owner else "add"
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        a, b = node.args
        gm.add_submodule(name, Add(skip_operands(a, b, modules)))
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(name, (a, b))
        node.replace_all_uses_with(call)
        call.meta = dict(node.meta)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
