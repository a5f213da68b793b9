"""The predictor network: a small dilated 1-D convolution over the 64-tick window.

In-graph preprocessing keeps the ONNX file self-contained: log1p compresses the ratios, each
channel is also given relative to its own mean over the window's first 48 ticks (so a model
trained on one service's levels transfers to another's) and as a first difference.
"""
import torch
from torch import nn

import features
from features import N_FEATURES, WINDOW

TAIL = 16  # conv outputs the head reads


class Net(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        c = 3 * N_FEATURES
        self.conv = nn.Sequential(
            nn.Conv1d(c, hidden, 3, dilation=1), nn.ReLU(),
            nn.Conv1d(hidden, hidden, 3, dilation=2), nn.ReLU(),
            nn.Conv1d(hidden, hidden, 3, dilation=4), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # Platt scaling, fitted on validation data at its natural base rate (train.calibrate):
        # p = sigmoid(scale * logit + shift) is then a probability the breaker's threshold can
        # mean something against.
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("shift", torch.tensor(0.0))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(window) * self.scale + self.shift)

    def logit(self, window: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(torch.clamp(window, min=0.0)).transpose(1, 2)  # [B, 8, 64]
        rel = x - x[:, :, :48].mean(dim=2, keepdim=True)
        d = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)
        # The head reads the last 16 outputs of the convolutions, which see only the last
        # 16 + 2 + 4 + 8 = 30 ticks: convolving just those is the same result at a third of the
        # cost (the first 48 ticks still set each channel's baseline above).
        h = self.conv(torch.cat([x, rel, d], dim=1)[:, :, -(TAIL + 14):])  # [B, hidden, 16]
        tail = h[:, :, -TAIL:]
        z = torch.cat([tail[:, :, -4:].mean(dim=2), tail.amax(dim=2)], dim=1)
        return self.head(z)


def export(net: Net, path: str) -> None:
    """Write `net` to `path` as ONNX, its input features named in the file's metadata
    (`features.METADATA_KEY`; `OnnxPredictor` checks them against the Rust list)."""
    net.eval()
    torch.onnx.export(
        net, torch.zeros(1, WINDOW, N_FEATURES), path,
        input_names=["window"], output_names=["p_anomaly"],
        dynamic_axes={"window": {0: "batch"}, "p_anomaly": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    features.stamp(path)
