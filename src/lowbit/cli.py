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
