"""The feature contract: `features.FEATURES` is the Rust list (run with
`python -m unittest discover -s tower-degrade-ai/training -p 'test_*.py'`)."""
import glob
import os
import re
import unittest

import features

HERE = os.path.dirname(os.path.abspath(__file__))
CORE_SRC = os.path.normpath(os.path.join(HERE, "..", "..", "tower-degrade", "src"))


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


if __name__ == "__main__":
    unittest.main()
