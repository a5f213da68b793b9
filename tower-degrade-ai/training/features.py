"""The model's input: the eight features, in order, and the metadata that records them.

This is the one place the training pipeline reads the feature list from. It mirrors
`tower_degrade::predict::FEATURES` (Rust), and `test_features.py` fails when the two differ.

Every model the pipeline exports carries the list in its ONNX metadata (`metadata_props`):

    key   tower_degrade.features
    value rate_ratio,success_rate,error_rate,timeout_rate,p50_over_sla,p99_over_sla,inflight_over_little,queue_delay_over_sla

(the names, in input order, joined by commas, no spaces). `OnnxPredictor` refuses a model whose
list differs from the Rust one, or that has none. To run a model trained elsewhere on these
features, in this order, stamp it:

    python features.py MODEL.onnx [MODEL.onnx ...]   # needs the `onnx` package

A model with a second input (the long baseline, `baseline.py`) is stamped with the baseline
it must be fed too (`tower_degrade.baseline`): train it on `baseline.of`'s rows.
"""
from __future__ import annotations

import os
import sys

import numpy as np

FEATURES = [
    "rate_ratio",
    "success_rate",
    "error_rate",
    "timeout_rate",
    "p50_over_sla",
    "p99_over_sla",
    "inflight_over_little",
    "queue_delay_over_sla",
]
N_FEATURES = len(FEATURES)
WINDOW = 64  # ticks a model sees

# Column indices, by name.
RATE = FEATURES.index("rate_ratio")
SUCCESS = FEATURES.index("success_rate")
ERROR = FEATURES.index("error_rate")
TIMEOUT = FEATURES.index("timeout_rate")
P50 = FEATURES.index("p50_over_sla")
P99 = FEATURES.index("p99_over_sla")
INFLIGHT = FEATURES.index("inflight_over_little")
QUEUE = FEATURES.index("queue_delay_over_sla")

# Clip ranges, as in the Rust feature code.
CLIP_HI = np.array([10, 1, 1, 1, 20, 20, 20, 20], dtype=np.float32)

# A healthy class, in FEATURES order: rate, success, errors, timeouts, p50, p99, in-flight,
# queueing. Where a dataset lacks a channel, it holds this level (datasets.py, and the docs'
# advice for your own exports), so the model sees an ordinary value there, not an impossible one.
NEUTRAL = np.array([1.0, 1.0, 0.0, 0.0, 0.15, 0.5, 0.2, 0.03], dtype=np.float32)

# The ONNX metadata key naming the model's input features.
METADATA_KEY = "tower_degrade.features"


def metadata_value(features=FEATURES) -> str:
    """The metadata value for a feature list: the names joined by commas."""
    return ",".join(features)


def parse_metadata_value(value: str) -> list:
    """The feature list a metadata value names (blanks around names are ignored)."""
    return [name.strip() for name in value.split(",")]


def check(metadata: dict, model: str = "model") -> None:
    """Raise ValueError unless `metadata` (an ONNX model's custom metadata map) names FEATURES
    under METADATA_KEY, in order."""
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{model}: no `{METADATA_KEY}` metadata naming its input features (expected "
            f"{metadata_value()}); if it was trained on them, in this order, stamp it with "
            f"`python features.py {model}`")
    found = parse_metadata_value(metadata[METADATA_KEY])
    if found != FEATURES:
        raise ValueError(f"{model}: trained on features [{', '.join(found)}], "
                         f"but the predictor feeds [{', '.join(FEATURES)}]")


def stamp_model(model, extra=None) -> None:
    """Set METADATA_KEY (and the `extra` entries) on an `onnx.ModelProto` in place, replacing
    any earlier values and keeping the other metadata."""
    new = {METADATA_KEY: metadata_value(), **(extra or {})}
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in new]
    del model.metadata_props[:]
    for key, value in kept + list(new.items()):
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def stamp(path: str, extra=None) -> None:
    """Rewrite the ONNX file at `path` with METADATA_KEY (and the `extra` entries) set (what
    the exporter and the command line do): same graph and weights, more metadata."""
    import onnx
    model = onnx.load(path)
    stamp_model(model, extra)
    onnx.save(model, path)


def _checked(path: str):
    """The model at `path` (an `onnx.ModelProto`) and the metadata entries a stamp sets on it:
    METADATA_KEY, and for a model with a second input the baseline's key too
    (`baseline.METADATA_KEY`). A ValueError naming the file where it cannot be stamped."""
    import onnx
    import baseline
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory: name the model file in it")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf's DecodeError and the like do not name the file
        raise ValueError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None
    weights = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if not inputs:
        raise ValueError(f"{path}: the model has no input")
    # A stamp says the window's last axis holds these features in this order: a model whose
    # window has another number of them cannot take them (its window's length is the
    # runtime's contract, which it checks at load).
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 3 or dims[2] not in (None, N_FEATURES):
        shown = "[" + ", ".join("dynamic" if d is None else str(d) for d in dims) + "]"
        raise ValueError(f"{path}: input `{inputs[0].name}` has shape {shown}, not [batch, ticks, "
                         f"{N_FEATURES}]: it cannot take the {N_FEATURES} features; not stamped")
    extra = {baseline.METADATA_KEY: baseline.METADATA_VALUE} if len(inputs) > 1 else {}
    return model, extra


def stamp_file(path: str) -> dict:
    """What the command line does to one file: METADATA_KEY, and for a model with a second
    input the baseline's key too (`baseline.METADATA_KEY`). Returns the entries set."""
    import onnx
    model, extra = _checked(path)
    stamp_model(model, extra)
    onnx.save(model, path)
    return {METADATA_KEY: metadata_value(), **extra}


def main(paths: list) -> None:
    """Stamp every file of `paths`, or, if one cannot be stamped, none of them (exit naming it)."""
    try:
        for p in paths:
            _checked(p)
    except ValueError as e:
        sys.exit(f"features.py: {e}")
    for p in paths:
        for key, value in stamp_file(p).items():
            print(f"{p}: {key} = {value}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    main(sys.argv[1:])
