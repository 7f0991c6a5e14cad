"""How the PyTorch front end gives a quantized model's weights their integer codes: a registry of weight roundings
(:mod:`lowbit.torch.rounding.registry`), applied after calibration, one method per file.

``nearest`` (:mod:`~lowbit.torch.rounding.nearest`) keeps the codes calibration gave (each weight to its nearest
code); ``gptq`` (:mod:`~lowbit.torch.rounding.gptq`) chooses the codes of the Conv/Linear weights for the least
output error on the calibration data; ``adaround`` (:mod:`~lowbit.torch.rounding.adaround`) learns them layer by
layer on the quantized model's own inputs; ``stochastic`` (:mod:`~lowbit.torch.rounding.stochastic`) draws each
code ``floor(w / s + u)``, seeded; ``awq`` (:mod:`~lowbit.torch.rounding.awq`) scales the input columns of
Linear layers by their activations' magnitude before rounding (``awq+gptq``: then GPTQ's codes). GPTQ and AdaRound
choose among the layers of :mod:`~lowbit.torch.rounding.roundable` and read a convolution's input patches through
:mod:`~lowbit.torch.rounding.patches`.

Adding a method is one file here with ``@register("name")`` on its function, imported below.

>>> available()
['adaround', 'awq', 'awq+gptq', 'gptq', 'nearest', 'stochastic']
"""

# Each method registers itself on import.
from lowbit.torch.rounding import adaround, awq, gptq, nearest, stochastic  # noqa: F401
from lowbit.torch.rounding.registry import METHODS, WeightRounding, available, get, register

__all__ = ["METHODS", "WeightRounding", "available", "get", "register"]
