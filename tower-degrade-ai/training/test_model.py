"""The networks' own promises (needs torch: skipped where only the harness's NumPy is installed)."""
import importlib.util
import os
import tempfile
import unittest

import numpy as np

HAS_TORCH = importlib.util.find_spec("torch") is not None


@unittest.skipUnless(HAS_TORCH, "torch is not installed (train.py's requirements)")
class AnchoredHead(unittest.TestCase):
    arch = "za"

    def setUp(self):
        import torch

        import model
        self.torch, self.model = torch, model
        torch.manual_seed(3)
        self.net = model.build(self.arch)
        # A head far from its initial weights: whatever it learnt, the bound holds.
        with torch.no_grad():
            for p in list(self.net.skip.parameters()) + list(self.net.mlp.parameters()):
                p.mul_(25.0)

    def inputs(self, n=512):
        rng = np.random.default_rng(5)
        window = rng.lognormal(-1.0, 1.0, size=(n, 64, 8)).astype(np.float32)
        window[:, :, 1] = rng.uniform(0.5, 1.0, size=(n, 64))
        base = np.sort(rng.lognormal(-1.0, 0.5, size=(n, 5, 8)).astype(np.float32), axis=1)
        return self.torch.from_numpy(np.concatenate([window, base], axis=1))

    def test_the_head_moves_the_logit_at_most_the_bound_off_the_z_score(self):
        x = self.inputs()
        with self.torch.no_grad():
            off = (self.net.logit(x) - self.net.b) / self.torch.exp(self.net.log_a) - self.net.prior(x)
        self.assertLessEqual(float(off.abs().max()), self.model.ZANet.BOUND + 1e-5)
        self.assertGreater(float(off.abs().max()), 0.5 * self.model.ZANet.BOUND)  # the head does act

    def test_its_onnx_file_with_the_head_silenced_scores_the_anchor_alone(self):
        # make_fixtures.silence_head, as lodo.py and the ScanPredictor fixture use it: the
        # exported network (its head far from 0 here) with the head's weights at 0.
        import onnxruntime as ort

        import make_fixtures
        x = self.inputs(64)
        net = self.net
        with self.torch.no_grad():
            want = self.torch.sigmoid((self.torch.exp(net.log_a) * net.prior(x) + net.b) * net.scale
                                      + net.shift)[:, 0].numpy()
            trained = net(x)[:, 0].numpy()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            self.model.export(net, path)
            silent = os.path.join(d, "silent.onnx")
            with open(silent, "wb") as f:
                f.write(make_fixtures.silence_head(path).SerializeToString())
            s = ort.InferenceSession(silent, providers=["CPUExecutionProvider"])
            got = s.run(None, {"window": x[:, :64].numpy(), "baseline": x[:, 64:].numpy()})[0][:, 0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        self.assertGreater(np.abs(trained - want).max(), 1e-3)  # the head did act before

    def test_steps_whose_z_scores_are_far_apart_keep_their_order(self):
        x = self.inputs()
        with self.torch.no_grad():
            prior = self.net.prior(x)[:, 0].numpy()
            p = self.net.logit(x)[:, 0].numpy()
        i, j = np.triu_indices(len(prior), 1)
        far = np.abs(prior[i] - prior[j]) > 2 * self.model.ZANet.BOUND
        self.assertGreater(far.sum(), 1000)
        self.assertTrue(np.all(np.sign(prior[i] - prior[j])[far] == np.sign(p[i] - p[j])[far]))


class AnchoredHeadWithoutTheWindowBranch(AnchoredHead):
    arch = "zal"


class AnchoredHeadWithOneSelection(AnchoredHead):
    arch = "zam"


class AnchoredScan(AnchoredHead):
    arch = "zs"

    def shifted(self, sizes):
        """A flat window on a flat baseline (median 1, scale about 0.11 on the log1p scale)
        whose p99 channel stands the given number of baseline spreads above it on the last
        len(sizes) ticks."""
        torch = self.torch
        q = torch.tensor([0.9, 0.95, 1.0, 1.05, 1.1]).log1p()
        med = float(q[2])
        scale = float((q[3] - q[1]) / 1.349 + 0.05 * (q[4] - q[0]) + 1e-3)
        window = torch.ones(1, 64, 8)
        for i, z in enumerate(reversed(sizes)):
            window[0, 63 - i, 5] = float(np.expm1(med + z * scale))
        base = torch.tensor([0.9, 0.95, 1.0, 1.05, 1.1])[None, :, None].expand(1, 5, 8)
        return torch.cat([window, base], dim=1)

    def test_a_held_shift_outranks_a_larger_one_tick_blip(self):
        with self.torch.no_grad():
            held = self.net.prior(self.shifted([4.0] * 8))
            blip = self.net.prior(self.shifted([9.0]))
            za = self.model.build("za").prior(self.shifted([4.0] * 8))
        # 4 spreads for 8 ticks is 4 sqrt(8) = 11.3 as a scan; the blip is 9.
        self.assertGreater(float(held), float(blip))
        self.assertAlmostEqual(float(held), float(self.model.squash(self.torch.tensor(4.0 * 8 ** 0.5))), 4)
        # ZANet reads only the last tick: to it the held shift is 4.
        self.assertLess(float(za), float(blip))

    def test_the_padding_of_a_short_history_is_no_evidence(self):
        # A class with one tick of history: the runtime pads the window with 63 zero ticks.
        # Read as ticks, they would stand far below the baseline for 7 ticks of the scan.
        x = self.shifted([0.0])
        x[0, :63] = 0.0
        with self.torch.no_grad():
            self.assertAlmostEqual(float(self.net.prior(x)), 0.0, 5)
            x[0, 63, 5] = float(self.shifted([4.0])[0, 63, 5])
            self.assertAlmostEqual(float(self.net.prior(x)), float(self.model.squash(self.torch.tensor(4.0))), 4)

    def test_a_deviation_that_flips_sign_does_not_add_up(self):
        with self.torch.no_grad():
            flip = self.net.prior(self.shifted([4.0, -4.0] * 4))
        self.assertAlmostEqual(float(flip), float(self.model.squash(self.torch.tensor(4.0))), 4)


class AnchoredScanWithoutTheWindowBranch(AnchoredScan):
    arch = "zsl"

    def test_a_batch_takes_no_partial_selection(self):
        import onnx
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "zsl.onnx")
            self.model.export(self.net, path)
            ops = {n.op_type for n in onnx.load(path).graph.node}
        self.assertNotIn("TopK", ops)
        self.assertNotIn("Sort", ops)


class AnchoredScanWeighedByChannel(AnchoredScan):
    arch = "zsw"

    def test_a_channel_counts_by_its_factor(self):
        torch = self.torch
        with torch.no_grad():
            self.net.channel_log_w[0, 5, 0] = float(np.log(2.0))  # p99
            held = self.net.prior(self.shifted([4.0] * 8))
            self.net.channel_log_w[0, 5, 0] = float(np.log(0.1))
            damped = self.net.prior(self.shifted([4.0] * 8))
        self.assertAlmostEqual(float(held), float(self.model.squash(torch.tensor(2 * 4.0 * 8 ** 0.5))), 4)
        # the p99 channel's 11.3 spreads count 1.13 now: the other channels (at the median) 0
        self.assertAlmostEqual(float(damped), float(self.model.squash(torch.tensor(0.4 * 8 ** 0.5))), 4)


class NoAnchor(unittest.TestCase):
    @unittest.skipUnless(importlib.util.find_spec("onnx") is not None, "needs the onnx package")
    def test_a_model_without_the_anchored_head_is_refused_naming_the_file(self):
        import make_fixtures
        path = os.path.join(make_fixtures.FIXTURES, "baseline.onnx")
        with self.assertRaisesRegex(ValueError, "baseline.onnx: no initializer named net.skip."):
            make_fixtures.silence_head(path)


@unittest.skipUnless(HAS_TORCH, "torch is not installed (train.py's requirements)")
class Train(unittest.TestCase):
    def test_without_out_it_refuses_before_training_and_leaves_the_bundled_model_alone(self):
        import subprocess
        import sys
        here = os.path.dirname(os.path.abspath(__file__))
        bundled = os.path.join(here, "..", "models", "p_anomaly.onnx")
        before = os.stat(bundled).st_mtime_ns
        run = subprocess.run([sys.executable, os.path.join(here, "train.py"), "--epochs", "1"],
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(run.returncode, 2, run.stderr)
        self.assertIn("--out", run.stderr)
        self.assertEqual(os.stat(bundled).st_mtime_ns, before)

    def test_a_fit_runs_to_its_end_and_writes_the_model_and_what_it_did(self):
        # A fit that trained for minutes then failed writing its summary (a name no longer
        # imported) left no `.train.json` (what `lodo.py --reuse` looks for) and a traceback:
        # the whole of `fit`, on a few short simulated traces.
        import json
        import simulate
        import train
        traces = simulate.generate(11, 6, 1200, "train") + simulate.generate(12, 2, 1200, "val")
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "m.onnx")
            info = train.fit(traces, out, seed=3, epochs=1, n_hard=0, public_data=False,
                             log=lambda *_: None, threads=1)
            for suffix in (".onnx", ".train.json", ".reference.json", ".pt"):
                self.assertTrue(os.path.exists(os.path.join(d, "m" + suffix)), suffix)
            with open(os.path.join(d, "m.train.json")) as f:
                self.assertEqual(json.load(f), info)
        self.assertEqual(info["horizon"], {"500 ms ticks": 20, "minute steps": 6})
        self.assertEqual((info["epochs"], info["arch"]), (1, "zsl"))


@unittest.skipUnless(HAS_TORCH, "torch is not installed (train.py's requirements)")
class DatasetShares(unittest.TestCase):
    def test_the_log_gives_each_dataset_its_share_and_warns_of_one_of_few_windows(self):
        from train import FEW_WINDOWS, dataset_shares
        ds = np.array(["simulated"] * 100_000 + ["short"] * 42)
        y = np.zeros(len(ds), np.float32)
        y[:500] = 1
        lines = dataset_shares(ds, y, balance=True)
        self.assertEqual(lines[0], "  short: 42 windows (0 positive), each weighing 1.19e+03, 50.0 % of the loss")
        self.assertEqual(lines[1], "  simulated: 100000 windows (500 positive), each weighing 0.5, 50.0 % of the loss")
        self.assertRegex(lines[2], r"^warning: short: 42 windows weigh as much together as simulated's 100000, "
                                   r"each 2381 times one of those")
        # What helps: incidents in the train part, not a longer recording (a file without one
        # gives 200 windows however long it is).
        self.assertIn("however long it is (200 where its train part has no incident): record "
                      "incidents", lines[2])
        self.assertNotIn("record longer", lines[2])
        self.assertRegex(lines[3], r"^note: short: no positive window .*inject faults throughout a "
                                   r"recording, not only at its end$")
        # One of the harness's own datasets (SMD's published train part has no labelled
        # incident) is told so, not to record incidents.
        public = np.array(["simulated"] * 100_000 + ["smd"] * FEW_WINDOWS)
        lines = dataset_shares(public, (np.arange(len(public)) < 500).astype(np.float32), True)
        self.assertEqual(lines[-1], "note: smd: no positive window (no incident in its train part): it "
                                    "teaches only what is normal")
        # Unbalanced, each window weighs 1 and nothing is over-weighted.
        lines = dataset_shares(ds, y, balance=False)
        self.assertIn("0.0 % of the loss", lines[0])
        self.assertFalse(any(line.startswith("warning") for line in lines))
        # A directory given that gives no window (an incident from its first step to its
        # last) is said not to be trained on, not left out of the log.
        lines = dataset_shares(ds, y, balance=True, given={"short", "simulated", "all-incident"})
        self.assertRegex(lines[0], r"^warning: all-incident: no training window .*it is not trained on$")
        self.assertEqual(lines[1], "  short: 42 windows (0 positive), each weighing 1.19e+03, 50.0 % of the loss")
        # Enough windows (the public data's smallest has 1,600): no warning.
        ds = np.array(["simulated"] * 100_000 + ["smd"] * FEW_WINDOWS)
        self.assertFalse(any(line.startswith("warning") for line in dataset_shares(ds, np.ones(len(ds)), True)))


if __name__ == "__main__":
    unittest.main()
