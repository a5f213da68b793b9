"""The feature contract: `features.FEATURES` is the Rust list, and the models name it in their
metadata (run with `python -m unittest discover -s tower-degrade-ai/training -p 'test_*.py'`;
the model checks need onnxruntime, the stamping checks the `onnx` package)."""
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import unittest

import features

HERE = os.path.dirname(os.path.abspath(__file__))
CRATE = os.path.normpath(os.path.join(HERE, ".."))
CORE_SRC = os.path.normpath(os.path.join(HERE, "..", "..", "tower-degrade", "src"))
SHIPPED = os.path.join(CRATE, "models", "p_anomaly.onnx")
FIXTURES = os.path.join(CRATE, "tests", "fixtures")

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_ONNX = importlib.util.find_spec("onnx") is not None


def rust_constants() -> tuple:
    """(FEATURES, N_FEATURES, WINDOW) as `tower_degrade::predict` defines them, read from the
    Rust source file that declares `pub const FEATURES` (wherever it sits under src/)."""
    for path in sorted(glob.glob(os.path.join(CORE_SRC, "**", "*.rs"), recursive=True)):
        with open(path) as f:
            src = f.read()
        m = re.search(r"pub const FEATURES: \[&str; \w+\] = \[(.*?)\];", src, re.S)
        if not m:
            continue
        names = re.findall(r'"([^"]*)"', m.group(1))
        consts = {k: int(v) for k, v in re.findall(r"pub const (N_FEATURES|WINDOW): usize = (\d+);", src)}
        return names, consts.get("N_FEATURES"), consts.get("WINDOW")
    raise AssertionError(f"no `pub const FEATURES` under {CORE_SRC}")


def session_metadata(path: str) -> dict:
    import onnxruntime as ort
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.get_modelmeta().custom_metadata_map


class Contract(unittest.TestCase):
    def test_the_python_list_is_the_rust_list(self):
        names, n, window = rust_constants()
        self.assertEqual(features.FEATURES, names)
        self.assertEqual((features.N_FEATURES, features.WINDOW), (n, window))

    def test_column_indices_follow_the_list(self):
        self.assertEqual([features.RATE, features.SUCCESS, features.ERROR, features.TIMEOUT,
                          features.P50, features.P99, features.INFLIGHT, features.QUEUE],
                         list(range(features.N_FEATURES)))

    def test_the_metadata_value_is_the_names_joined_by_commas(self):
        v = features.metadata_value()
        self.assertEqual(v, ",".join(features.FEATURES))
        self.assertNotIn(" ", v)
        self.assertEqual(features.parse_metadata_value(v), features.FEATURES)
        self.assertEqual(features.parse_metadata_value(v.replace(",", ", ")), features.FEATURES)

    def test_check_names_the_key_or_both_lists(self):
        features.check({features.METADATA_KEY: features.metadata_value()})
        with self.assertRaisesRegex(ValueError, r"m\.onnx: no `tower_degrade\.features` metadata"):
            features.check({}, "m.onnx")
        swapped = list(reversed(features.FEATURES))
        with self.assertRaises(ValueError) as e:
            features.check({features.METADATA_KEY: ",".join(swapped)}, "m.onnx")
        self.assertIn(", ".join(swapped), str(e.exception))
        self.assertIn(", ".join(features.FEATURES), str(e.exception))


@unittest.skipUnless(HAS_ORT, "needs onnxruntime")
class Models(unittest.TestCase):
    def test_the_shipped_model_names_the_features(self):
        features.check(session_metadata(SHIPPED), SHIPPED)

    def test_the_fixtures_are_wrong_as_named(self):
        features.check(session_metadata(os.path.join(FIXTURES, "window_32.onnx")))
        with self.assertRaisesRegex(ValueError, "trained on features"):
            features.check(session_metadata(os.path.join(FIXTURES, "features_reordered.onnx")))
        with self.assertRaisesRegex(ValueError, "no `tower_degrade.features` metadata"):
            features.check(session_metadata(os.path.join(FIXTURES, "features_missing.onnx")))
        import baseline
        baseline.check(session_metadata(os.path.join(FIXTURES, "baseline.onnx")))
        with self.assertRaisesRegex(ValueError, "found None"):
            baseline.check(session_metadata(os.path.join(FIXTURES, "baseline_undeclared.onnx")))


@unittest.skipUnless(HAS_ORT, "needs onnxruntime")
class Scoring(unittest.TestCase):
    def test_a_model_that_is_not_there_or_not_onnx_is_named_so(self):
        # ONNX Runtime's own words were all a user got: "[ONNXRuntimeError] : 7 :
        # INVALID_PROTOBUF ..." for train.py's .pt given in place of its .onnx.
        import evaluate
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaisesRegex(ValueError, r"none.onnx: no such file"):
                evaluate.Model(os.path.join(d, "none.onnx"))
            with self.assertRaisesRegex(ValueError, r": not a file"):
                evaluate.Model(d)
            weights = os.path.join(d, "m.pt")
            with open(weights, "wb") as f:
                f.write(b"PK\x03\x04 torch weights")
            with self.assertRaisesRegex(ValueError, r"m.pt: not an ONNX model ONNX Runtime can load "
                                                    r"\(train.py's .pt beside it holds PyTorch weights"):
                evaluate.Model(weights)

    def test_the_harness_refuses_a_model_the_runtime_would_refuse(self):
        # A model that answers 5 (a logit, say): OnnxPredictor refuses it, so the harness must
        # not report on it as if the runtime ran it.
        import numpy as np
        import evaluate
        from traces import Trace
        model = evaluate.Model(os.path.join(FIXTURES, "out_of_range.onnx"))
        tr = Trace("svc", "mine", np.zeros((70, 8), np.float32), [], 0.5)
        with self.assertRaisesRegex(evaluate.NotAProbability,
                                    r"out_of_range.onnx: answered 5 on step 0 of svc, not a probability"):
            model(tr)

    def test_the_harness_refuses_at_load_a_model_of_a_shape_the_runtime_refuses(self):
        # As OnnxPredictor's contract check: the file and what does not fit, before any
        # scoring (an output [batch, 2] read by its first column scored P(normal) as the model).
        import tempfile
        import evaluate
        import make_fixtures
        cases = {
            "window_32.onnx": r"input `window` has shape \[dynamic, 32, 8\], expected \[batch, 64, 8\]",
            "window_f64.onnx": r"input `window` holds f64, expected f32",
            "batch_1.onnx": r"input `window` has shape \[1, 64, 8\], expected \[batch, 64, 8\] \(the batch "
                            r"dimension must be dynamic",
        }
        for name, reason in cases.items():
            with self.subTest(name), self.assertRaisesRegex(
                    ValueError, rf"model .*{name} does not fit the predictor contract .*: {reason}"):
                evaluate.Model(os.path.join(FIXTURES, name))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "two_columns.onnx")
            with open(path, "wb") as f:
                f.write(make_fixtures.two_columns().SerializeToString())
            with self.assertRaisesRegex(ValueError, r"two_columns.onnx does not fit .*: output "
                                        r"`p_anomaly` has shape \[dynamic, 2\], expected \[batch, 1\]"):
                evaluate.Model(path)
        # what fits is taken: the fixtures with the long baseline and the bundled model
        evaluate.Model(os.path.join(FIXTURES, "baseline.onnx"))
        evaluate.Model(SHIPPED)

    def test_a_series_first_steps_are_not_scored_as_the_breaker_does_not_use_them(self):
        # The breaker takes no prediction until the window is whole (`is_full`): the harness
        # must not count the padded start's answers as trips, nor as early warnings.
        import numpy as np
        import evaluate
        from calibrate import UNUSED_STEPS
        from traces import Trace
        rng = np.random.default_rng(3)
        X = np.zeros((300, 8), np.float32)  # a healthy class, features in FEATURES' order
        X[:, 0] = 1 + 0.05 * rng.standard_normal(300)  # rate
        X[:, 1], X[:, 2] = 0.99, 0.01  # success, errors
        X[:, 4:6] = 0.2 + 0.01 * rng.standard_normal((300, 2))  # p50, p99 over the SLA
        X[:, 6:] = 0.5 + 0.02 * rng.standard_normal((300, 2))  # in flight, queueing
        out = evaluate.Model(SHIPPED)(Trace("svc", "mine", X, [], 0.5))
        self.assertTrue(np.isnan(out[:UNUSED_STEPS]).all())
        self.assertTrue(((out[UNUSED_STEPS:] >= 0) & (out[UNUSED_STEPS:] <= 1)).all())
        # at any threshold, no alarm on the steps the breaker does not use
        self.assertFalse(evaluate.alarms(out, 0.0, 1)[:UNUSED_STEPS].any())


@unittest.skipUnless(HAS_ONNX, "needs the onnx package")
class Stamping(unittest.TestCase):
    def test_the_command_line_stamps_a_two_input_model_with_its_baseline_too(self):
        import shutil
        import onnx
        import baseline
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            shutil.copy(os.path.join(FIXTURES, "baseline_undeclared.onnx"), path)
            model = onnx.load(path)
            del model.metadata_props[:]
            onnx.save(model, path)
            stamped = features.stamp_file(path)
            self.assertEqual(stamped[baseline.METADATA_KEY], baseline.METADATA_VALUE)
            meta = {p.key: p.value for p in onnx.load(path).metadata_props}
            features.check(meta, path)
            baseline.check(meta, path)
            # A one-input model gets the feature list alone.
            shutil.copy(os.path.join(FIXTURES, "window_32.onnx"), path)
            self.assertEqual(list(features.stamp_file(path)), [features.METADATA_KEY])

    def test_the_command_line_names_a_file_it_cannot_stamp(self):
        import onnx
        from onnx import TensorProto, helper
        with tempfile.TemporaryDirectory() as d:
            missing = os.path.join(d, "none.onnx")
            with self.assertRaisesRegex(ValueError, r"none.onnx: no such file"):
                features.stamp_file(missing)
            text = os.path.join(d, "text.onnx")
            with open(text, "w") as f:
                f.write("not a model")
            with self.assertRaisesRegex(ValueError, r"text.onnx: not an ONNX model"):
                features.stamp_file(text)
            # a window of 4 features cannot take the 8
            four = os.path.join(d, "four.onnx")
            graph = helper.make_graph(
                [helper.make_node("ReduceMean", ["window"], ["p_anomaly"], axes=[2], keepdims=0)],
                "four", [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", 64, 4])],
                [helper.make_tensor_value_info("p_anomaly", TensorProto.FLOAT, ["batch", 64])])
            onnx.save(helper.make_model(graph), four)
            with self.assertRaisesRegex(ValueError, r"four.onnx: input `window` has shape "
                                        r"\[dynamic, 64, 4\], not \[batch, ticks, 8\]"):
                features.stamp_file(four)
            self.assertFalse(onnx.load(four).metadata_props, "left as it was")
            with self.assertRaisesRegex(ValueError, r"a directory"):
                features.stamp_file(d)
            # the command line: one file it cannot stamp, and none is stamped
            import shutil
            good = os.path.join(d, "good.onnx")
            shutil.copy(os.path.join(FIXTURES, "features_missing.onnx"), good)
            run = subprocess.run([sys.executable, os.path.join(HERE, "features.py"), good, four],
                                 capture_output=True, text=True)
            self.assertEqual(run.returncode, 1)
            self.assertIn("features.py: ", run.stderr)
            self.assertIn("four.onnx", run.stderr)
            self.assertNotIn("Traceback", run.stderr)
            self.assertFalse(onnx.load(good).metadata_props, "none stamped")

    def test_stamp_sets_the_key_once_and_keeps_other_metadata(self):
        import onnx
        import make_fixtures
        model = make_fixtures.tiny(feature_list=make_fixtures.reordered())
        onnx.helper.set_model_props(model, {"author": "someone",
                                            features.METADATA_KEY: "stale"})
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            onnx.save(model, path)
            features.stamp(path)
            first = open(path, "rb").read()
            features.stamp(path)
            self.assertEqual(open(path, "rb").read(), first, "stamping twice changes nothing")
            props = [(p.key, p.value) for p in onnx.load(path).metadata_props]
        self.assertEqual(props, [("author", "someone"),
                                 (features.METADATA_KEY, features.metadata_value())])

    def test_the_scan_predictors_constants_are_the_bundled_models(self):
        # `ScanPredictor` (src/scan.rs) maps its anchor to a probability with the bundled
        # model's log_a, b, scale and shift, written into the Rust source: a retrained model
        # must carry them over.
        import numpy as np
        import onnx
        from onnx import numpy_helper
        with open(os.path.join(CRATE, "src", "scan.rs")) as f:
            src = f.read()
        rust = {k: np.float32(v.replace("_", ""))
                for k, v in re.findall(r"const (LOG_A|B|SCALE|SHIFT): f32 = ([-0-9._e]+);", src)}
        shipped = {i.name: numpy_helper.to_array(i) for i in onnx.load(SHIPPED).graph.initializer}
        self.assertEqual(rust, {k: np.float32(shipped[f"net.{k.lower()}"])
                                for k in ("LOG_A", "B", "SCALE", "SHIFT")})

    def test_the_committed_fixtures_are_what_make_fixtures_writes(self):
        import onnx
        import make_fixtures
        for name, model in make_fixtures.fixtures().items():
            self.assertEqual(onnx.load(os.path.join(FIXTURES, name)), model, name)


if __name__ == "__main__":
    unittest.main()
