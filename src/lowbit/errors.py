"""Errors lowbit raises on bad input. Each message says what is wrong and what to do about it."""


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class SpecError(LowbitError, ValueError):
    """An invalid quantization spec, or parameters that do not fit the tensor they are applied to."""


class CalibrationError(LowbitError, ValueError):
    """Calibration cannot go on: bad data, no data yet, or statistics that do not fit together."""


class FormatError(LowbitError, ValueError):
    """A file is not in the format it claims to be."""


class AnalyzeError(LowbitError, ValueError):
    """Options or a model that cannot be analysed as asked."""


class DataWarning(UserWarning):
    """Data lowbit accepts, but perhaps not as meant (an array used for an input of another name)."""
