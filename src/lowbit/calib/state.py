"""Save the statistics of many calibrators to one .npz file and load them back, in another process too."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from lowbit._io import atomic_open
from lowbit.calib.base import Calibrator, create
from lowbit.errors import CalibrationError

_META = "__lowbit_calibrators__"


def save(path: str | os.PathLike, calibrators: Mapping[str, Calibrator]) -> None:
    """Write ``{tensor name: calibrator}`` to ``path`` (.npz, written atomically).

    Statistics from several processes merge exactly: ``load`` each file and ``merge`` the calibrators.
    """
    meta, arrays = [], {}
    for index, (name, calibrator) in enumerate(calibrators.items()):
        state = calibrator.state_dict()
        meta.append({k: state[k] for k in ("method", "options", "num_batches")} | {"tensor": name})
        for key, value in state["state"].items():
            arrays[f"{index}.{key}"] = value
    arrays[_META] = np.array(json.dumps(meta))
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def load(path: str | os.PathLike) -> dict[str, Calibrator]:
    """The calibrators :func:`save` wrote, by tensor name."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data[_META]))
            arrays = {k: data[k] for k in data.files if k != _META}
    except (OSError, ValueError, KeyError) as exc:
        raise CalibrationError(f"{os.fspath(path)} is not a lowbit calibrator file: {exc}") from None
    out = {}
    for index, entry in enumerate(meta):
        calibrator = create(entry["method"], **entry["options"])
        prefix = f"{index}."
        state = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        calibrator.load_state_dict({**entry, "state": state})
        out[entry["tensor"]] = calibrator
    return out
