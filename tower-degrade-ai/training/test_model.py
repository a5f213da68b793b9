"""The networks' own promises (needs torch: skipped where only the harness's NumPy is installed)."""
import importlib.util
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


if __name__ == "__main__":
    unittest.main()
