"""Without PyTorch installed (an ONNX-only setup), the PyTorch front end and its tests are not collected."""

import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("torch") is None:
    collect_ignore_glob += ["src/lowbit/torch/*", "tests/torch/*"]
if importlib.util.find_spec("transformers") is None:  # lowbit[hf]: its module imports transformers
    collect_ignore_glob += ["src/lowbit/torch/hf.py"]
