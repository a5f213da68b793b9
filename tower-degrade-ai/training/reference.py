"""Python onnxruntime's answers on a fixed input, for the Rust test that checks ort gives the
same (`tests/onnx/main.rs`, `rust_and_python_onnxruntime_agree`).

    python reference.py ../models/p_anomaly.onnx   # writes ../models/p_anomaly.reference.json
"""
import json
import os
import sys

import numpy as np

from features import N_FEATURES, WINDOW

BATCH = 4


LEVEL = np.array([1.0, 1.0, 0.0, 0.0, 0.15, 0.5, 0.2, 0.03], dtype=np.float32)


def fixed_input() -> np.ndarray:
    """A healthy class whose latency, in-flight and queueing channels (f >= 4) ramp from tick 48
    on, faster with each batch row b, plus a ripple:
    x[b, t, f] = L[f] (1 + [f >= 4] b max(t - 48, 0) / 8) + ((131 b + 17 t + 7 f) mod 23) / 200,
    the same formula as the Rust test. The rows span the model's range, from sure-healthy to
    sure-breach."""
    b, t, f = np.meshgrid(np.arange(BATCH), np.arange(WINDOW), np.arange(N_FEATURES), indexing="ij")
    ramp = 1 + (f >= 4) * b * np.maximum(t - 48, 0) / 8.0
    x = LEVEL[f] * ramp + ((131 * b + 17 * t + 7 * f) % 23) / 200
    return x.astype(np.float32)


def fixed_baseline(x: np.ndarray) -> np.ndarray:
    """For a model that takes the long baseline: each batch row's baseline is the quantiles
    (baseline.quantiles) of its own fixed window."""
    import baseline
    return np.stack([baseline.quantiles(w) for w in x])


def write(model: str) -> str:
    import onnxruntime as ort
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = fixed_input()
    names = [i.name for i in s.get_inputs()]
    feed = {names[0]: x}
    if len(names) > 1:
        feed[names[1]] = fixed_baseline(x)
    out = s.run(None, feed)[0][:, 0]
    path = os.path.splitext(model)[0] + ".reference.json"
    with open(path, "w") as f:
        json.dump({"onnxruntime": ort.__version__, "p_anomaly": [float(v) for v in out]}, f, indent=1)
    return path


if __name__ == "__main__":
    print(write(sys.argv[1]))
