"""The SVG charts: legends sit beside the data, never on it, in a box as wide as their text; named x axes."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

from lowbit.analysis import plots

NS = {"s": "http://www.w3.org/2000/svg"}
EM = 0.6  # an independent upper estimate of a sans-serif character's width, in font sizes


def _rect(e) -> tuple[float, float, float, float]:
    x, y = float(e.get("x")), float(e.get("y"))
    return x, y, x + float(e.get("width")), y + float(e.get("height"))


def _parts(svg: str):
    root = ET.fromstring(svg)
    plot = root.find(".//s:rect[@class='plot']", NS)
    legend = root.find(".//s:g[@class='legend']", NS)
    assert plot is not None and legend is not None, "the chart names its data area and its legend"
    return root, _rect(plot), _rect(legend.find("s:rect", NS)), legend.findall("s:text", NS)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _text_fits(box, texts, size=11.0):
    for t in texts:
        x, y = float(t.get("x")), float(t.get("y"))
        assert box[0] <= x and x + len(t.text) * size * EM <= box[2], f"{t.text!r} runs out of its box"
        assert box[1] <= y - size * 0.8 and y <= box[3], f"{t.text!r} is above or below its box"


def test_the_legend_of_a_line_chart_covers_no_point_and_fits_its_text():
    names = ("accumulated (full INT8 model)", "own (only this layer INT8)")
    svg = plots.lines({names[0]: ([0, 1, 2, 3], [10, 12, 11, 300]), names[1]: ([0, 1, 2, 3], [300, 20, 30, 299])},
                      "SQNR", "layer", "dB")  # fmt: skip  # the last points at the top right corner
    root, plot, box, texts = _parts(svg)
    assert not _overlap(plot, box)
    assert [t.text for t in texts] == list(names)
    _text_fits(box, texts)
    for c in root.iter("{http://www.w3.org/2000/svg}circle"):
        cx, cy = float(c.get("cx")), float(c.get("cy"))
        assert plot[0] < cx < plot[2] and plot[1] <= cy <= plot[3]  # inside the frame, not on its border
        assert not (box[0] <= cx <= box[2] and box[1] <= cy <= box[3])
    assert box[3] <= float(root.get("height"))


def test_the_legend_of_a_histogram_leaves_the_range_lines_at_its_edges_visible():
    marks = {"minmax (39.9 dB)": (-387.0, 107.75), "percentile (39.9 dB)": (-382.9, 106.7),
             "entropy (29.3 dB)": (-301.8, 107.75), "mse (40.0 dB)": (-375.0, 104.4)}  # fmt: skip
    edges = [-387.0 + i * 4.9 for i in range(101)]
    svg = plots.histogram(edges, [5.0] * 100, "c2", marks=marks)
    root, plot, box, texts = _parts(svg)
    assert not _overlap(plot, box)
    _text_fits(box, texts)
    lines = [e for e in root.iter("{http://www.w3.org/2000/svg}line") if e.find("s:title", NS) is not None]
    assert len(lines) == 2 * len(marks)
    for e in lines:
        x = float(e.get("x1"))
        assert plot[0] < x < plot[2]  # drawn inside the frame, not on its border line
        assert not _overlap(box, (x - 1, float(e.get("y1")), x + 1, float(e.get("y2"))))


def test_a_long_legend_wraps_inside_the_image():
    series = {f"series number {i} with a long name": ([0, 1], [i, i + 1]) for i in range(5)}
    root, plot, box, texts = _parts(plots.lines(series, "t", "x", "y"))
    assert len(texts) == 5 and not _overlap(plot, box)
    _text_fits(box, texts)
    assert box[2] <= float(root.get("width")) and box[3] <= float(root.get("height"))


def _xnames(svg):
    root = ET.fromstring(svg)
    plot = _rect(root.find(".//s:rect[@class='plot']", NS))
    below = [t for t in root.iter("{http://www.w3.org/2000/svg}text")
             if float(t.get("y")) > plot[3] and "rotate" in (t.get("transform") or "")]  # fmt: skip
    return root, plot, below


def test_a_named_x_axis_shows_the_layer_names_shortened_with_their_full_name_in_a_tooltip():
    names = ["conv1", "conv2", "/encoder/layer.0/attention/self/query/MatMul", "fc"]
    svg = plots.lines({"a": (range(4), [1, 2, 3, 4]), "b": (range(4), [4, 3, 2, 1])}, "t", "layer", "dB",
                      xnames=names)  # fmt: skip
    root, plot, labels = _xnames(svg)
    assert [t.find("s:title", NS).text for t in labels] == names
    shown = ["".join(t.itertext())[len(t.find("s:title", NS).text) :] for t in labels]
    assert shown[:2] == ["conv1", "conv2"] and shown[3] == "fc"
    assert shown[2].startswith("\u2026") and names[2].endswith(shown[2][1:]) and len(shown[2]) <= 18
    xs = [float(t.get("x")) for t in labels]
    assert xs == sorted(xs) and plot[0] < xs[0] and xs[-1] < plot[2]
    height = float(root.get("height"))
    for t, text in zip(labels, shown, strict=True):  # rotated 45 degrees down to the left: inside the image
        reach = len(text) * 11 * EM * 0.7072
        assert float(t.get("x")) - reach >= 0 and float(t.get("y")) + reach <= height
    circles = [float(c.get("cx")) for c in root.iter("{http://www.w3.org/2000/svg}circle")]
    assert sorted(set(round(c, 1) for c in circles)) == [round(x, 1) for x in xs]  # one name under each point


def test_many_names_are_thinned_to_stay_readable():
    names = [f"layer{i}" for i in range(300)]
    root, _plot, labels = _xnames(plots.lines({"a": (range(300), [float(i) for i in range(300)])}, "t", "l", "dB",
                                              xnames=names))  # fmt: skip
    xs = [float(t.get("x")) for t in labels]
    assert (
        10 < len(labels) < 300 and min(b - a for a, b in itertools.pairwise(xs)) * 0.7071 >= 11
    )  # a line apart, across
    assert float(root.get("width")) <= 1100


def test_bars_shorten_long_labels_with_an_ellipsis():
    name = "/model/stage4/block3/attention/output/dense/MatMul"
    root = ET.fromstring(plots.bars([name, "fc"], [3.0, 40.0], "t", "dB"))
    texts = [t for t in root.iter("{http://www.w3.org/2000/svg}text") if t.find("s:title", NS) is not None]
    assert [t.find("s:title", NS).text for t in texts] == [name, "fc"]
    shown = "".join(texts[0].itertext())[len(name) :]
    assert shown.startswith("\u2026") and name.endswith(shown[1:])
