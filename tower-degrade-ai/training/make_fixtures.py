"""The tiny ONNX models the Rust tests load (`tests/onnx/main.rs`), each wrong in one way:

    python make_fixtures.py [OUT_DIR]   # default ../tests/fixtures; needs the `onnx` package

- `window_32.onnx`: takes `window [batch, 32, 8]` instead of 64 ticks (features stamped right);
- `window_f64.onnx`: takes and answers f64 instead of f32 (shapes and features right);
- `batch_1.onnx`: its batch dimension fixed at 1 (a model for one class only);
- `features_reordered.onnx`: the right shapes, but its metadata names p99 before p50;
- `features_missing.onnx`: the right shapes, and no `tower_degrade.features` metadata;
- `baseline.onnx`: takes the long baseline as a second input, `baseline [batch, 5, 8]`, and
  declares it (`tower_degrade.baseline`): p_anomaly = sigmoid(mean(window) - mean(baseline)),
  right in every way;
- `baseline_undeclared.onnx`: the same, without the `tower_degrade.baseline` entry;
- `nan_above.onnx`: a probability for each row whose window's values are all at most 10,
  NaN for a row with one above (a class over 10x its SLA): one class's odd window, not the
  batch's;
- `endless.onnx`: a Loop of 2^62 trips before it answers: a model that never does, which
  only ONNX Runtime's termination flag stops;
- `anchor.onnx`: the bundled model (`../models/p_anomaly.onnx`) with its learnt head's weights
  at 0, its anchor alone, which `ScanPredictor` computes in Rust (the test runs the two side by
  side); rewrite it whenever the bundled model changes.

The others are p_anomaly = sigmoid(mean(window)). Each but `anchor.onnx` is a few hundred
bytes; all are written the same byte for byte on every run (`test_features.py` checks the
committed files against this script).
"""
from __future__ import annotations

import os

import baseline
import features
from features import N_FEATURES, WINDOW

FIXTURES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))


def _model(graph, props: dict | None):
    """`graph` as an opset-17 model with the metadata `props`, if any."""
    from onnx import helper
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="tower-degrade-ai make_fixtures.py", ir_version=8)
    if props is not None:
        helper.set_model_props(model, props)
    return model


def _stamped(feature_list=features.FEATURES) -> dict:
    """The metadata naming the features (`feature_list`, by default the predictor's)."""
    return {features.METADATA_KEY: features.metadata_value(feature_list)}


def tiny(window: int = WINDOW, feature_list=None, dtype: str = "FLOAT", batch="batch"):
    """p_anomaly [batch, 1] = sigmoid(mean over ticks and features of window [batch, window, 8]),
    with `feature_list` (if any) in its metadata; its tensors of `dtype` (an onnx.TensorProto
    name), its batch dimension `batch` (a name: dynamic; a number: fixed)."""
    from onnx import TensorProto, helper
    ty = getattr(TensorProto, dtype)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["window"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("Sigmoid", ["mean"], ["p"]),
            helper.make_node("Unsqueeze", ["p", "axes"], ["p_anomaly"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("window", ty, [batch, window, N_FEATURES])],
        [helper.make_tensor_value_info("p_anomaly", ty, [batch, 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    return _model(graph, None if feature_list is None else _stamped(feature_list))


def two_columns():
    """[P(normal), P(anomaly)] [batch, 2], what a classifier exported without slicing its
    probabilities answers: its first column is the wrong one. The features stamped."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["window"], ["mean"], axes=[2], keepdims=0),
            helper.make_node("Sigmoid", ["mean"], ["p"]),  # [batch, 64]
            helper.make_node("ReduceMean", ["p"], ["q"], axes=[1], keepdims=1),  # [batch, 1]
            helper.make_node("Sub", ["one", "q"], ["normal"]),
            helper.make_node("Concat", ["normal", "q"], ["p_anomaly"], axis=1),
        ],
        "two_columns",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", WINDOW, N_FEATURES])],
        [helper.make_tensor_value_info("p_anomaly", TensorProto.FLOAT, ["batch", 2])],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    return _model(graph, _stamped())


def with_baseline(declared: bool = True):
    """p_anomaly = sigmoid(mean(window) - mean(baseline)), the features stamped, and the
    baseline declared if `declared`."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["window"], ["w"], axes=[1, 2], keepdims=0),
            helper.make_node("ReduceMean", ["baseline"], ["b"], axes=[1, 2], keepdims=0),
            helper.make_node("Sub", ["w", "b"], ["d"]),
            helper.make_node("Sigmoid", ["d"], ["p"]),
            helper.make_node("Unsqueeze", ["p", "axes"], ["p_anomaly"]),
        ],
        "tiny_with_baseline",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", WINDOW, N_FEATURES]),
         helper.make_tensor_value_info("baseline", TensorProto.FLOAT,
                                       ["batch", baseline.N_QUANTILES, N_FEATURES])],
        [helper.make_tensor_value_info("p_anomaly", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    props = _stamped()
    if declared:
        props[baseline.METADATA_KEY] = baseline.METADATA_VALUE
    return _model(graph, props)


def out_of_range(base: float = 5.0, scale: float = 0.0, name: str = "out_of_range"):
    """p_anomaly = base + scale x mean(window): with the defaults 5, not a probability, whatever
    the input; `logit.onnx` (0.3 + 2 x mean) answers a probability for zeros only."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["window"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("Mul", ["mean", "scale"], ["z"]),
            helper.make_node("Add", ["z", "base"], ["p"]),
            helper.make_node("Unsqueeze", ["p", "axes"], ["p_anomaly"]),
        ],
        name,
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", WINDOW, N_FEATURES])],
        [helper.make_tensor_value_info("p_anomaly", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
                     helper.make_tensor("base", TensorProto.FLOAT, [], [base])],
    )
    return _model(graph, _stamped())


def nan_above(limit: float = 10.0):
    """p_anomaly = sigmoid(mean(window)) x (1 + 0 x sqrt(limit - max(window))): a probability
    while every value of a row's window is at most `limit`, NaN for a row with one above it
    (a class 10x over its SLA, with the default): a model that fails one class's odd window
    and not the others'."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["window"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("Sigmoid", ["mean"], ["s"]),
            helper.make_node("ReduceMax", ["window"], ["top"], axes=[1, 2], keepdims=0),
            helper.make_node("Sub", ["limit", "top"], ["room"]),
            helper.make_node("Sqrt", ["room"], ["root"]),
            helper.make_node("Mul", ["root", "zero"], ["nothing"]),
            helper.make_node("Add", ["s", "nothing"], ["p"]),
            helper.make_node("Unsqueeze", ["p", "axes"], ["p_anomaly"]),
        ],
        "nan_above",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", WINDOW, N_FEATURES])],
        [helper.make_tensor_value_info("p_anomaly", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("limit", TensorProto.FLOAT, [], [limit]),
                     helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    return _model(graph, _stamped())


def endless():
    """p_anomaly = sigmoid(mean(window)) + 0 x (a Loop of 2^62 trips adding 1): a model that
    never answers (a run is stopped by ONNX Runtime's termination flag between the loop's
    iterations)."""
    from onnx import TensorProto, helper
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "one_b"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "endless_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])],
        initializer=[helper.make_tensor("one_b", TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trips", "yes", "zero"], ["acc"], body=body),
            helper.make_node("Mul", ["acc", "zero"], ["nothing"]),
            helper.make_node("ReduceMean", ["window"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("Sigmoid", ["mean"], ["s"]),
            helper.make_node("Add", ["s", "nothing"], ["p"]),
            helper.make_node("Unsqueeze", ["p", "axes"], ["p_anomaly"]),
        ],
        "endless",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", WINDOW, N_FEATURES])],
        [helper.make_tensor_value_info("p_anomaly", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("trips", TensorProto.INT64, [], [1 << 62]),
                     helper.make_tensor("yes", TensorProto.BOOL, [], [True]),
                     helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    return _model(graph, _stamped())


BUNDLED = os.path.join(os.path.dirname(FIXTURES), "..", "models", "p_anomaly.onnx")
# The bundled network's head (`model.ZANet.skip` and `.mlp`): its weights are set to 0.
HEAD = ("net.skip.", "net.mlp.")


def silence_head(path: str):
    """The anchored model at `path` (ONNX) with every weight of its learnt head at 0 (the
    initializers named HEAD*): its score is then sigmoid((exp(log_a) anchor + b) scale + shift),
    a fixed increasing function of the anchor alone. `lodo.py` scores each fold's model so
    beside the model; `anchor.onnx` is the bundled model so, which ScanPredictor computes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    m = onnx.load(path)
    heads = [i for i in m.graph.initializer if i.name.startswith(HEAD)]
    if not heads:
        raise ValueError(f"{path}: no initializer named {' or '.join(HEAD)}*: not an anchored model")
    for init in heads:
        init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    return m


def reordered() -> list:
    f = list(features.FEATURES)
    f[features.P50], f[features.P99] = f[features.P99], f[features.P50]
    return f


def fixtures() -> dict:
    """File name -> model."""
    return {
        "window_32.onnx": tiny(32, features.FEATURES),
        "window_f64.onnx": tiny(feature_list=features.FEATURES, dtype="DOUBLE"),
        "batch_1.onnx": tiny(feature_list=features.FEATURES, batch=1),
        "features_reordered.onnx": tiny(feature_list=reordered()),
        "features_missing.onnx": tiny(),
        "baseline.onnx": with_baseline(),
        "baseline_undeclared.onnx": with_baseline(declared=False),
        "out_of_range.onnx": out_of_range(),
        "logit.onnx": out_of_range(0.3, 2.0, "logit"),
        "nan_above.onnx": nan_above(),
        "endless.onnx": endless(),
        "anchor.onnx": silence_head(os.path.normpath(BUNDLED)),
    }


def main(out: str = FIXTURES) -> None:
    os.makedirs(out, exist_ok=True)
    for name, model in fixtures().items():
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        print(path)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=FIXTURES, metavar="OUT_DIR",
                    help="where the fixtures go (default: the Rust tests' fixtures)")
    main(ap.parse_args().out)
