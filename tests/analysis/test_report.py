"""The HTML report and the text table of an analysis: the summary, 1 - cosine, the SQNR chart's named axis."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

import pytest

from lowbit.analysis import Analysis, Error, LayerReport
from lowbit.analysis.report import render

# A small model: quantizing one layer alone moves the model's cosine only in the 6th or 7th decimal
GAPS = {"conv1": 4.0e-7, "conv2": 3.1e-6, "/blocks/block.3/mlp/fc2/Gemm": 2.5e-5}


def _analysis() -> Analysis:
    layers = [
        LayerReport(name, "Conv", name + "_out", accumulated=Error(40.0 - i, 1 - 10 * gap, 0.1),
                    own=Error(50.0 - i, 1 - gap, 0.01), own_model=Error(60.0 - i, 1 - gap, 0.01), index=2 - i)
        for i, (name, gap) in enumerate(GAPS.items())
    ]  # fmt: skip
    return Analysis("m.onnx", "ort", "mse", 16, 0.1, 0.2, "y", Error(35.0, 1 - 3e-5, 0.2), None, layers, {}, [])


def _tables(html):
    return re.findall(r"<table>(.*?)</table>", html, re.S)


def _cells(row):
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]


def _rows(table):
    return [_cells(r) for r in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)]


def test_the_summary_table_starts_with_its_first_row_of_numbers_not_an_empty_header():
    summary = _rows(_tables(render(_analysis()))[0])
    assert summary[0] == ["model", "m.onnx"]
    assert all(all(c.strip() for c in row) for row in summary)


def test_the_layer_table_shows_one_minus_cosine_so_that_small_errors_read_apart():
    a = _analysis()
    table = next(t for t in _tables(render(a)) if "rank" in t)
    head, *rows = _rows(table)
    model, accumulated = head.index("model 1 - cosine"), head.index("accum. 1 - cosine")
    assert len({r[model] for r in rows}) == len(GAPS)
    for row in rows:
        gap = GAPS[row[1]]
        assert float(row[model]) == pytest.approx(gap, rel=0.01)
        assert float(row[accumulated]) == pytest.approx(10 * gap, rel=0.01)
    whole = dict(r for r in _rows(_tables(render(a))[0]) if len(r) == 2)
    assert float(whole["whole model: output 1 - cosine"]) == pytest.approx(3e-5, rel=0.01)
    assert a.to_dict()["layers"][0]["own_model"]["cosine"] == 1 - GAPS["conv1"]  # the JSON keeps the cosine


def test_the_text_table_shows_one_minus_cosine_too():
    text = _analysis().table()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("rank"))
    assert "model 1 - cosine" in header
    for name, gap in GAPS.items():
        row = next(line for line in lines if f" {name} " in line)
        assert any(w == f"{gap:.2e}" for w in row.split()), row
    assert "1 - cosine 3.00e-05" in lines[0]


def test_an_exact_layer_reads_zero():
    a = _analysis()
    a.layers[0].own_model = Error(300.0, 1.0, 0.0)
    rows = _rows(next(t for t in _tables(render(a)) if "rank" in t))
    assert rows[1][rows[0].index("model 1 - cosine")] == "0"


def test_the_sqnr_chart_names_its_layers_in_graph_order():
    html = render(_analysis())
    svgs = [base64.b64decode(u).decode() for u in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', html)]
    chart = next(ET.fromstring(s) for s in svgs if "in graph order" in s)
    titled = [t for t in chart.iter("{http://www.w3.org/2000/svg}text")
              if t.find("{http://www.w3.org/2000/svg}title") is not None]  # fmt: skip
    in_order = sorted(_analysis().layers, key=lambda r: r.index)
    assert [t.find("{http://www.w3.org/2000/svg}title").text for t in titled] == [r.name for r in in_order]
    labels = ["".join(t.itertext()) for t in titled]
    assert all(not re.fullmatch(r"[\d.]+", x) for x in labels)  # not numbers
