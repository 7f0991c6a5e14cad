"""The analysis as one self-contained HTML file: tables and SVG plots embedded, nothing fetched from a network."""

from __future__ import annotations

import json
import os
from html import escape
from typing import Any

from lowbit._io import atomic_write_text
from lowbit.analysis import plots
from lowbit.analysis.results import format_bytes, format_cosine_gap
from lowbit.recipe import available_targets, get_target

TOP_TENSORS = 8  # layers whose tensors get histograms
TOP_WEIGHTS = 6  # poorly per-tensor-quantizable weights whose channel ranges are plotted

STYLE = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
.figs { display: flex; flex-wrap: wrap; gap: 8px; } .note { color: #555; font-size: 13px; }
tr.bad td { background: #fde8e8; }
"""


def _how(m) -> str:
    """How a mixed-precision search took its layers, for the report."""
    if m.names is None:
        return "one more at a time"
    rounded = f", the weights re-rounded by {m.rounding} for each" if m.rounding else ""
    return f"the first k for a few k (doubling, then bisection{rounded})"


def _img(svg: str, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="{plots.data_uri(svg)}">'


def _table(headers: list[str] | None, rows: list[list[Any]], left: int = 1, bad: list[bool] | None = None) -> str:
    """An HTML table: a header row of ``headers`` (none when None), the first ``left`` columns left-aligned, the
    rows where ``bad`` is true marked."""
    body = []
    if headers is not None:
        body.append("<tr>" + "".join(f'<th class="{"l" if i < left else ""}">{escape(h)}</th>'
                                     for i, h in enumerate(headers)) + "</tr>")  # fmt: skip
    for r, row in enumerate(rows):
        cls = ' class="bad"' if bad and bad[r] else ""
        cells = "".join(f'<td class="{"l" if i < left else ""}">{escape(str(c))}</td>' for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>{''.join(body)}</table>"


def render(analysis) -> str:
    """The report's HTML for a :class:`lowbit.analysis.Analysis`: a summary, then one section per part."""
    a = analysis
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>lowbit analysis: {escape(os.path.basename(a.model))}</title><style>{STYLE}</style></head><body>",
        f"<h1>Quantization analysis of {escape(os.path.basename(a.model))}</h1>",
        _summary(a),
    ]
    for section in (_sensitivity, _mixed, _activations, _weights, _profile, _extracted):
        out += section(a)
    out.append("</body></html>\n")
    return "".join(out)


def _summary(a) -> str:
    summary = [
        ["model", a.model],
        ["target / calibration", f"{a.target} / {a.method}"],
        ["analysis samples", a.samples],
        ["quantized layers", len(a.layers)],
        ["whole model: output SQNR", f"{a.output_error.sqnr_db:.2f} dB"],
        ["whole model: output 1 - cosine", format_cosine_gap(a.output_error.cosine)],
        ["whole model: max abs error", f"{a.output_error.max_abs_error:.4g}"],
    ]
    if a.top1_agreement is not None:
        summary.append(["whole model: top-1 agreement with FP32", f"{a.top1_agreement:.2f}%"])
    summary += [["calibration time", f"{a.calibration_seconds:.1f} s"], ["analysis time", f"{a.seconds:.1f} s"]]
    return _table(None, summary, left=2)


def _sensitivity(a) -> list[str]:
    """Every layer's own and accumulated error, ranked, with the two plots."""
    out = ["<h2>Layer sensitivity</h2>"]
    out.append(
        "<p class='note'>Each layer is quantized alone (every other layer in float) and the model's output is "
        "compared with FP32: the lower the SQNR, the more that layer alone costs. <i>Own</i> is the error of the "
        "layer's own output in that model; <i>accumulated</i> is the error of the layer's output in the fully "
        "quantized model, where every layer before it adds its share.</p>"
    )
    top = a.layers[:30]
    figs = [
        _img(
            plots.bars([r.name for r in top], [r.own_model.sqnr_db for r in top],
                       "Model output SQNR with only this layer quantized (most sensitive first)", "SQNR (dB)"),
            "sensitivity ranking",
        ),
    ]  # fmt: skip
    order = sorted(a.layers, key=lambda r: r.index)
    figs.append(
        _img(
            plots.lines(
                {
                    "accumulated (full INT8 model)": (range(len(order)), [r.accumulated.sqnr_db for r in order]),
                    "own (only this layer INT8)": (range(len(order)), [r.own.sqnr_db for r in order]),
                },
                "SQNR of each layer's output, in graph order",
                "layer (graph order)",
                "SQNR (dB)",
                xnames=[r.name for r in order],
            ),
            "error along the graph",
        )
    )
    out.append(f"<div class='figs'>{''.join(figs)}</div>")
    rows = [
        [i + 1, r.name, r.op_type, f"{r.own_model.sqnr_db:.2f}", format_cosine_gap(r.own_model.cosine),
         f"{r.own.sqnr_db:.2f}", f"{r.accumulated.sqnr_db:.2f}", format_cosine_gap(r.accumulated.cosine),
         f"{r.accumulated.max_abs_error:.4g}"]
        for i, r in enumerate(a.layers)
    ]  # fmt: skip
    out.append(
        _table(
            ["rank", "layer", "op", "model SQNR dB", "model 1 - cosine", "own SQNR dB", "accum. SQNR dB",
             "accum. 1 - cosine", "accum. max err"],
            rows,
            left=0,
        )
    )  # fmt: skip
    return out


def _mixed(a) -> list[str]:
    """The mixed-precision search's curve and steps (nothing when none ran)."""
    m = a.mixed
    if m is None:
        return []
    out = []
    out.append("<h2>Automatic mixed precision</h2>")
    verdict = "met" if m.met else "not met"
    out.append(
        f"<p class='note'>Layers {escape(m.action)} {escape(_how(m))}, {escape(m.order)}; metric "
        f"<b>{escape(m.metric)}</b>, FP32 {m.reference:.4f}{escape(m.unit)}, budget: drop &le; {m.max_drop}"
        f"{escape(m.budget_unit)} &mdash; {verdict} with {m.final.kept} layer(s) {escape(m.action)}: "
        f"{escape(', '.join(m.kept) or 'none')}.</p>"
    )
    if m.sized:
        out.append(f"<p class='note'>{escape(m.size_note())}.</p>")
    noise = m.noise_note()
    if noise:
        out.append(f"<p class='note'>{escape(noise)}</p>")
    ks = [s.kept for s in m.steps]
    out.append(
        _img(
            plots.lines(
                {m.metric: (ks, [s.score for s in m.steps])},
                f"{m.metric} vs number of layers {m.action}",
                f"layers {m.action}",
                m.metric + m.unit,
                hline=m.reference - m.max_drop,
                hline_label="budget",
            ),
            "mixed precision curve",
        )
    )
    out.append(
        _table(
            ["k", m.layer_column, "score", "drop"] + (["weights"] if m.sized else []),
            [
                [s.kept, s.layer or "(all quantized)", f"{s.score:.4f}", f"{s.drop:.4f}"]
                + ([format_bytes(s.weight_bytes)] if m.sized else [])
                for s in m.steps
            ],
            left=0,
        )
    )
    return out


def _activations(a) -> list[str]:
    """The histograms of the most sensitive layers' tensors with the range each calibrator picks."""
    out = ["<h2>Activation ranges: what each calibrator chooses</h2>"]
    out.append(
        "<p class='note'>The histogram of each input and output of the most sensitive layers, with the range each "
        "calibration method picks on it and the SQNR that range gives on these values (higher is better). "
        f"lowbit used <b>{escape(a.method)}</b>.</p>"
    )
    shown: list[str] = []
    for r in a.layers[:TOP_TENSORS]:
        for t in [*r.inputs, r.output]:
            if t in a.tensors and t not in shown:
                shown.append(t)
    for t in shown:
        rep = a.tensors[t]
        marks = {f"{m} ({v['sqnr_db']:.1f} dB)": (v["lo"], v["hi"]) for m, v in rep.ranges.items()}
        out.append(f"<h3>{escape(t)}</h3>")
        out.append(_img(plots.histogram(rep.edges, rep.counts, t, marks=marks), f"histogram of {t}"))
        best = max(rep.ranges, key=lambda m: rep.ranges[m]["sqnr_db"])
        out.append(
            _table(
                ["method", "lo", "hi", "SQNR dB"],
                [[m + (" (used)" if m == rep.chosen else "") + (" (best)" if m == best else ""), f"{v['lo']:.5g}",
                  f"{v['hi']:.5g}", f"{v['sqnr_db']:.2f}"] for m, v in rep.ranges.items()],
            )
        )  # fmt: skip
    return out


def _weights(a) -> list[str]:
    """Per-tensor vs per-channel SQNR of every weight, and the channel ranges of the poor ones."""
    out = ["<h2>Weights: per tensor vs per channel</h2>"]
    out.append(
        "<p class='note'>INT8 SQNR of each weight with one scale for the whole tensor and with one scale per output "
        "channel (lowbit uses per channel by default). Where channels' ranges differ widely, as in depthwise "
        "convolutions, one scale wastes most levels on the small channels: such weights are marked.</p>"
    )
    out.append(
        _table(
            ["layer", "weight", "depthwise", "per-tensor SQNR dB", "per-channel SQNR dB"],
            [[w.layer, w.weight, "yes" if w.depthwise else "", f"{w.per_tensor_sqnr_db:.2f}",
              f"{w.per_channel_sqnr_db:.2f}"] for w in a.weights],
            left=2,
            bad=[w.poor for w in a.weights],
        )
    )  # fmt: skip
    poor = [w for w in a.weights if w.poor][:TOP_WEIGHTS]
    if poor:
        out.append(
            "<div class='figs'>"
            + "".join(
                _img(plots.ranges(w.channel_min, w.channel_max, f"{w.layer}: range of each output channel"),
                     f"channel ranges of {w.weight}")
                for w in poor
            )
            + "</div>"
        )  # fmt: skip
    return out


def _profile(a) -> list[str]:
    """The kernels ONNX Runtime ran (nothing when not profiled)."""
    p = a.profile
    if p is None:
        return []
    out = []
    out.append("<h2>Where INT8 really runs (ONNX Runtime CPU profile)</h2>")
    which = "the mixed-precision model" if a.mixed is not None else "the fully quantized model"
    note = f"Kernels of {which}, after ONNX Runtime's graph optimizations."
    target = get_target(a.target) if a.target in available_targets() else None
    if target is not None and not target.timed_on_ort:
        note += (
            f" This model is laid out for {target.runtime} (--target {target.name}), not for ONNX Runtime's "
            "integer kernels."
        )
    out.append(f"<p class='note'>{escape(note)}</p>")
    out.append(f"<p class='note'>{escape(p.summary())}</p>")
    out.append(
        _table(
            ["node", "kernel", "kind", "ms", "input types"],
            [[k.node, k.op, k.kind, f"{k.ms:.4f}", ",".join(k.input_types)] for k in p.kernels],
            left=3,
            bad=[k.float_matrix for k in p.kernels],
        )
    )
    return out


def _extracted(a) -> list[str]:
    if not a.extracted:
        return []
    return ["<h2>Extracted layers</h2><ul>", *(f"<li>{escape(path)}</li>" for path in a.extracted), "</ul>"]


def write_report(analysis, path: str | os.PathLike) -> None:
    atomic_write_text(path, render(analysis))


def write(analysis, json_path=None, html=None) -> None:
    """The numbers of ``analysis`` as JSON at ``json_path`` and its HTML report at ``html`` (either may be None),
    each written atomically."""
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(analysis.to_dict(), indent=1) + "\n")
    if html is not None:
        write_report(analysis, html)
