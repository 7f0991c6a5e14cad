"""``lowbit.torch.quantize``: the one entry point of the PyTorch front end.

    model = lowbit.torch.quantize(model, "int8", calib=loader)        # PTQ static
    model = lowbit.torch.quantize(model, "int8_dynamic")             # PTQ dynamic: no data
    model.train(); ...                                               # QAT: train it as it is

Steps: copy the model (unless ``inplace``), eval mode, fold Conv+BatchNorm, trace the residual additions into
:class:`~lowbit.torch.layers.Add` layers (only if the config's ``residual_adds``), swap every Conv/Linear/Add the
config quantizes for its ``Quant*`` layer (:data:`lowbit.torch.layers.MODULE_MAP`), fix the weights' scales from the
weights, then run ``calib`` with the input quantizers in ``"calibrate"`` mode and fix their scales; then the
config's ``refine`` stage (``"easyquant"``: :mod:`lowbit.torch.easyquant` searches the scales again, layer by layer),
then the weight rounding (``rounding``), which chooses the codes at the scales the stage chose.

``calib`` is an iterable of batches (a tensor: ``model(batch)``; a tuple or list: ``model(*batch)``; a dict:
``model(**batch)``), such as a DataLoader that yields inputs only, or a callable ``calib(model)`` that runs the
model over data itself (a forward loop: for loaders that yield (input, label) pairs, say).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lowbit.errors import CalibrationError, SpecError
from lowbit.recipe import Config, to_dict
from lowbit.torch import distributed
from lowbit.torch import rounding as weight_rounding
from lowbit.torch.config import RECIPE_ATTRIBUTE, resolve
from lowbit.torch.easyquant import easyquant
from lowbit.torch.ends import resolve_ends
from lowbit.torch.fold import fold_batchnorm, set_submodule
from lowbit.torch.layers import MODULE_MAP
from lowbit.torch.qat import batch_statistics, prepare_conv_bn
from lowbit.torch.quantizer import TensorQuantizer
from lowbit.torch.residual import trace_residual_adds
from lowbit.torch.runner import Calib, is_loop, run_batch, run_data
from lowbit.torch.smoothing import smoothquant

BN_STATS = ("running", "batch")


def _check_bn_stats(bn_stats: str) -> None:
    if bn_stats not in BN_STATS:
        raise SpecError(f"bn_stats must be one of {', '.join(BN_STATS)}, got {bn_stats!r}")


class _Captured(Exception):
    pass


def _first_input(model: nn.Module, calib: Calib) -> tuple[Callable[[nn.Module], Any], Iterable[Any] | None]:
    """A function that runs the model on the first calibration input, and the batches left to calibrate on
    (None when ``calib`` is a forward loop, which is then run again whole)."""
    if is_loop(calib):
        captured: dict[str, Any] = {}

        def grab(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Captured

        handle = model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            calib(model)
        except _Captured:
            pass
        except Exception as exc:
            raise CalibrationError(f"the calibration forward loop failed ({type(exc).__name__}: {exc})") from exc
        finally:
            handle.remove()
        if "args" not in captured:
            raise CalibrationError("the calibration forward loop never ran the model: calib(model) must call model")
        args, kwargs = captured["args"], captured["kwargs"]
        return (lambda m: m(*args, **kwargs)), None
    if isinstance(calib, torch.Tensor):
        raise CalibrationError(
            "calib is one tensor; pass an iterable of batches (a list of tensors, or a DataLoader of inputs)"
        )
    iterator = iter(calib)
    try:
        first = next(iterator)
    except StopIteration:
        raise CalibrationError("calib yielded no batch: give it at least one") from None
    return (lambda m: run_batch(m, first, 0)), itertools.chain([first], iterator)


def quantizable_layers(model: nn.Module, config: Config) -> dict[str, nn.Module]:
    """The layers of ``model`` that ``config`` quantizes, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) in MODULE_MAP and config.for_layer(name) is not None and name
    }


def _check_patterns(model: nn.Module, config: Config, also: Iterable[str] = ()) -> None:
    names = [n for n, m in model.named_modules() if type(m) in MODULE_MAP] + list(also)
    for pattern, _ in config.overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise SpecError(
                f"config pattern {pattern!r} matches no quantizable layer; the model's quantizable layers are: "
                f"{shown or 'none'} (patterns are fnmatch globs over module names, like 'features.*' or '*.fc')"
            )


def _check_layers(model: nn.Module, config: Config, also: Iterable[str] = ()) -> None:
    """Every override pattern matches a quantizable layer (or a name of ``also``: attention modules), and the
    config quantizes at least one layer."""
    _check_patterns(model, config, also)
    if not quantizable_layers(model, config):
        kinds = ", ".join(sorted(t.__name__ for t in MODULE_MAP))
        raise SpecError(f"nothing to quantize: the model has no {kinds} layer that the config quantizes")


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every :class:`TensorQuantizer` of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def calibrate(
    model: nn.Module,
    calib: Calib,
    *,
    progress: bool = True,
    batches: Iterable[Any] | None = None,
    bn_stats: str = "running",
) -> int:
    """Run ``calib`` through ``model`` with every static, enabled input quantizer in ``"calibrate"`` mode, then
    fix their scales. Returns how many batches ran (0 for a forward loop).

    ``bn_stats``: the statistics the BatchNorms normalise with meanwhile: ``"running"`` (the model's own mode; in
    eval mode, inference's running statistics) or ``"batch"`` (each batch's own, as in training, through
    :func:`~lowbit.torch.qat.batch_statistics`; the running statistics are left as they were). Recalibrating a QAT
    model whose BatchNorm statistics moved: ``calibrate(model, batches, bn_stats="batch")``.
    """
    _check_bn_stats(bn_stats)
    static = [
        q
        for q in model.modules()
        if isinstance(q, TensorQuantizer) and not q.is_weight and not q.dynamic and q.mode != "disabled"
    ]
    if not static:
        return 0
    for q in static:
        q.mode = "calibrate"
    normalising = batch_statistics(model) if bn_stats == "batch" else contextlib.nullcontext()
    with torch.no_grad(), normalising:
        count = run_data(model, calib, "calibrating", progress and distributed.is_main(), batches)
    distributed.merge_calibration(static)  # under torch.distributed: every rank gets every rank's statistics
    unused = []
    for q in static:
        if q.mode == "disabled":  # it switched itself off (an Add of non-tensors)
            continue
        if q._calibrator is None and q._lo is None:
            q.mode = "disabled"  # the layer never ran: leave its input in float
            unused.append(q.name)
        else:
            q.load_calibration()
    if unused:
        warnings.warn(
            f"{len(unused)} quantized layer(s) never ran during calibration, their inputs stay float: "
            + ", ".join(unused[:5]),
            stacklevel=3,
        )
    return count


def quantize(
    model: nn.Module,
    config: str | Config = "int8",
    calib: Calib | None = None,
    *,
    fold_bn: bool = True,
    qat: bool = False,
    inplace: bool = False,
    progress: bool = True,
    rounding: str | None = None,
    bn_stats: str | None = None,
) -> nn.Module:
    """A quantized copy of ``model`` (in eval mode; ``inplace=True`` changes ``model`` itself).

    ``config``: a preset name (:data:`lowbit.recipe.PRESETS`: int8, int8_trt, int8_dynamic, w8a8_asym, w4a8,
    w4a16_group128, w4a4) or a :class:`~lowbit.recipe.Config`. ``calib``: calibration batches or a forward
    loop (see the module docstring); not needed when every quantized input is dynamic or float. ``fold_bn``: fold
    BatchNorms into the convolutions before them first. ``qat``: the model will be trained (QAT): keep each
    folded BatchNorm training inside a :class:`~lowbit.torch.qat.QuantConvBn2d` (:mod:`lowbit.torch.qat`)
    instead of folding its statistics away. Either way the returned model is in eval mode: call ``.train()``.
    ``rounding`` (default: the config's ``rounding``, else ``"nearest"``; the registry :mod:`lowbit.torch.rounding`):
    ``"nearest"`` rounds each weight to its nearest code; ``"gptq"`` chooses the codes of the Conv/Linear weights
    for the least output error on ``calib`` (:mod:`lowbit.torch.rounding.gptq`; worth it at 4 bits); ``"adaround"``
    learns them layer by layer on the quantized model's own inputs (:mod:`lowbit.torch.rounding.adaround`; slower,
    better, and it needs ``calib`` as batches); ``"awq"`` (and ``"awq+gptq"``) scales the input columns of Linear
    layers before rounding (:mod:`lowbit.torch.rounding.awq`). The config's ``smoothquant`` smooths activation
    outliers into the weights before the input ranges are calibrated (:func:`lowbit.torch.smoothing.smoothquant`);
    its ``act_order`` and ``blockwise`` reach GPTQ and AWQ (:mod:`lowbit.torch.blockwise`).
    The config's ``refine="easyquant"`` searches the weight and input
    scales before the rounding (:mod:`lowbit.torch.easyquant`; it needs ``calib`` as batches); the recipe recorded
    on the model (``model.lowbit_recipe``) says so.
    ``bn_stats``: which statistics the BatchNorms that stay in the model normalise with while the activation ranges
    are calibrated: ``"batch"``, those of each calibration batch, as training will (the default with ``qat``: the
    ranges fit what training feeds the quantizers, even when the running statistics are far from converged, as
    in a freshly initialised model; ranges calibrated on inference's activations would then clip nearly every
    training activation and the straight-through gradient would stop there), or ``"running"``, inference's running
    statistics (the default without ``qat``, where BatchNorms are folded away; with ``qat``, ranges equal to those
    of the PTQ model, fit for training once the running statistics have converged). The running statistics
    themselves are left as they were. In training a quantizer that clips most of its input warns
    (:class:`lowbit.torch.ClippingWarning`).

    >>> qat = quantize(model, preset("w4a4").with_learned_scales(), calib=batches, qat=True).train()  # doctest: +SKIP
    """
    cfg = resolve(config)
    if bn_stats is None:
        bn_stats = "batch" if qat else "running"
    _check_bn_stats(bn_stats)
    method = weight_rounding.get(rounding or cfg.rounding or "nearest")
    calib = _check_call(model, cfg, calib, method, inplace)
    hf = _transformers_support(model, cfg)
    attention = list(hf.attention_modules(model)) if hf is not None and cfg.attention_matmuls else []
    if not cfg.residual_adds:
        _check_layers(model, cfg, attention)
    cfg = resolve_ends(model, cfg)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    batches = None
    if calib is not None:
        run_first, batches = _first_input(model, calib)
        if fold_bn and qat:
            prepare_conv_bn(model, cfg, run_first)
        elif fold_bn:
            fold_batchnorm(model, run_first)
    if cfg.residual_adds:
        model = trace_residual_adds(model)
        _check_layers(model, cfg)
    _swap_layers(model, cfg)
    if hf is not None and cfg.attention_matmuls:
        hf.quantize_attention(model, cfg)
    if cfg.smoothquant is not None:  # before the input ranges: they are calibrated on the smoothed inputs
        smoothquant(model, calib, cfg.smoothquant, blocks=None if cfg.blockwise else False, progress=progress)
    if calib is not None and not cfg.dynamic:
        calibrate(model, calib, progress=progress, batches=batches, bn_stats=bn_stats)
    if cfg.refine == "easyquant":
        easyquant(model, calib, progress=progress)
    method.apply(model, calib, progress=progress, **method.options(cfg))
    setattr(model, RECIPE_ATTRIBUTE, to_dict(replace(cfg, rounding=method.name)))
    return model.eval()  # the modules swapped in (quantizers, the Identity of a folded BatchNorm) too


def _check_call(model: nn.Module, cfg: Config, calib: Calib | None, method, inplace: bool) -> Calib | None:
    """Refuse what cannot work together, before any work; a one-shot iterator becomes a list when the rounding
    or the refine stage reads the batches again."""
    _check_formats(cfg, method.name)
    distributed.check_methods(cfg.smoothquant is not None, method.name, cfg.refine)
    if method.needs_data and calib is None:
        raise CalibrationError(f"rounding={method.name!r} needs calibration data (calib=): it fits codes to the inputs")
    if method.batches_only and is_loop(calib):
        raise CalibrationError(
            f"rounding={method.name!r} needs calibration batches (a list of inputs), not a forward loop: it runs the "
            "float and the quantized model on the same batches, once per layer"
        )
    if cfg.refine is not None and calib is None:
        raise CalibrationError(
            f"refine={cfg.refine!r} needs calibration data (calib=): it compares each layer's output to FP32's"
        )
    if cfg.refine is not None and is_loop(calib):
        raise CalibrationError(
            f"refine={cfg.refine!r} needs calibration batches (a list of inputs), not a forward loop: it runs the "
            "float and the quantized model on the same batches, once per layer"
        )
    if cfg.smoothquant is not None and (calib is None or cfg.dynamic):
        raise CalibrationError(
            "smoothquant needs calibration data (calib=) and statically quantized inputs (a W8A8 config such as "
            "'int8'): it moves activation outliers into the weights before the input ranges are calibrated"
        )
    needs_again = method.needs_data or cfg.refine is not None or cfg.smoothquant is not None
    if needs_again and isinstance(calib, Iterator):
        calib = list(calib)
    if not isinstance(model, nn.Module):
        raise SpecError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if calib is None and not cfg.dynamic:
        raise CalibrationError(
            "static quantization needs calibration data: pass calib= (batches or a forward loop), or use a dynamic "
            "config such as 'int8_dynamic' or a weight-only one such as 'w4a16_group128'"
        )
    if cfg.residual_adds and inplace:
        raise SpecError("residual_adds returns a new torch.fx.GraphModule: it cannot quantize in place (inplace=False)")
    return calib


def _transformers_support(model: nn.Module, cfg: Config) -> ModuleType | None:
    """:mod:`lowbit.torch.hf` (which registers transformers' layer types) for a model built from transformers'
    classes, else None: transformers is an optional dependency that takes seconds to import, and such a model has
    imported it already."""
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        return importlib.import_module("lowbit.torch.hf")
    if cfg.attention_matmuls:
        raise SpecError(
            "attention_matmuls quantizes the attention of Hugging Face transformers models; this model has none of "
            "their modules: set attention_matmuls to False"
        )
    return None


def _check_formats(cfg: Config, rounding: str) -> None:
    """Weight roundings (GPTQ, AdaRound) choose integer codes: weights in another number format (FP8) round to
    nearest."""
    layers = [cfg.default, *(layer for _, layer in cfg.overrides)]
    weights = [lc.weight for lc in layers if lc is not None and lc.weight is not None]
    other = [w.format if w.format != "int" else "binary" for w in weights if w.format != "int" or w.scales_itself]
    if other and rounding != "nearest":
        raise SpecError(f"rounding={rounding!r} chooses integer codes; {other[0]} weights round to nearest only")


def _swap_layers(model: nn.Module, cfg: Config) -> None:
    """Every quantizable layer the config quantizes becomes its ``Quant*`` twin, its weight quantized."""
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    for name, module in quantizable_layers(model, cfg).items():
        new = MODULE_MAP[type(module)].from_float(module, cfg.for_layer(name), name)
        if next(module.parameters(), None) is None:  # an Add has no weights to sit beside: it goes to the model
            new.to(device)
        new.calibrate_weight()
        set_submodule(model, name, new)
