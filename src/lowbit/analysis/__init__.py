"""What a sensitivity analysis found, independent of the front end (ONNX or PyTorch), and how it is measured:
:mod:`lowbit.analysis.results` (the result types and their JSON), :mod:`lowbit.analysis.measures` (error meters,
histograms, weight ranges), :mod:`lowbit.analysis.report` (the HTML report, and :func:`write` for both files).
NumPy only."""

from lowbit.analysis.measures import (
    METHODS,
    ErrorMeter,
    cosine_rows,
    expected_sqnr_db,
    finite_rows,
    tensor_report,
    weight_report,
)
from lowbit.analysis.report import write
from lowbit.analysis.results import (
    MAX_SQNR_DB,
    POOR_GAP_DB,
    Analysis,
    Error,
    LayerReport,
    MixedResult,
    Step,
    TensorReport,
    WeightReport,
    format_bytes,
    format_cosine_gap,
    standard_error_points,
)

__all__ = [
    "MAX_SQNR_DB",
    "METHODS",
    "POOR_GAP_DB",
    "Analysis",
    "Error",
    "ErrorMeter",
    "LayerReport",
    "MixedResult",
    "Step",
    "TensorReport",
    "WeightReport",
    "cosine_rows",
    "expected_sqnr_db",
    "finite_rows",
    "format_bytes",
    "format_cosine_gap",
    "standard_error_points",
    "tensor_report",
    "weight_report",
    "write",
]
