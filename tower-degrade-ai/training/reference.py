"""Python onnxruntime's answers on a fixed input, for the Rust test that checks ort gives the
same (`tests/onnx/main.rs`, `rust_and_python_onnxruntime_agree`).

    python reference.py ../models/p_anomaly.onnx   # writes ../models/p_anomaly.reference.json
"""
import json
import os
import sys

import numpy as np

BATCH = 4


LEVEL = np.array([1.0, 1.0, 0.0, 0.0, 0.15, 0.5, 0.2, 0.03], dtype=np.float32)


def fixed_input() -> np.ndarray:
    """A healthy class's levels, ramping from tick 40 on at a rate growing with b, plus a
    ripple: x[b, t, f] = L[f] (1 + b max(t - 40, 0) / 8) + ((131 b + 17 t + 7 f) mod 23) / 200,
    the same formula as the Rust test."""
    b, t, f = np.meshgrid(np.arange(BATCH), np.arange(64), np.arange(8), indexing="ij")
    x = LEVEL[f] * (1 + b * np.maximum(t - 40, 0) / 8.0) + ((131 * b + 17 * t + 7 * f) % 23) / 200
    return x.astype(np.float32)


def write(model: str) -> str:
    import onnxruntime as ort
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: fixed_input()})[0][:, 0]
    path = os.path.splitext(model)[0] + ".reference.json"
    with open(path, "w") as f:
        json.dump({"onnxruntime": ort.__version__, "p_anomaly": [float(v) for v in out]}, f, indent=1)
    return path


if __name__ == "__main__":
    print(write(sys.argv[1]))
