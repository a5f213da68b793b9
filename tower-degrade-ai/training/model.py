"""The predictor networks (`build`): the bundled model's, `ZSLNet` (`--arch zsl`), a scan of
robust z-scores against the class's long baseline (each channel's mean over its last 1, 3 and
8 ticks, standardised) that a head of a few hundred weights over scale-free summaries of the
same baseline (`ZCNet`'s, less its window branch) may correct within a bound; and the ones it
was compared with in the leave-one-dataset-out evaluation (`Net`, the dilated 1-D convolution
bundled until 1 December 2026; `ZNet`; `ZBNet`; `ZCNet`, bundled on 1 December; `ZANet`, the
anchor on the last tick's z-score alone, bundled until 2 December; `ZSNet`, `ZSLNet` with the
window branch, bundled on 2 December; `ZSWNet`, whose scan weighs the channels).

In-graph preprocessing keeps each ONNX file self-contained: log1p compresses the ratios, and
each channel is also given relative to a baseline of its own (so that a model trained on one
service's levels transfers to another's).
"""
import torch
from torch import nn

import baseline
import features
from features import N_FEATURES, SUCCESS, WINDOW

TAIL = 16  # conv outputs the head reads
REF = 48  # the ticks each channel's baseline is taken over


def _middle(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 1]: the (REF // 2 + 1)-th smallest of each row of `x` [B, C, REF], the upper
    median: the largest of the row's REF // 2 + 1 smallest, found by a partial selection left
    unsorted (ONNX TopK with k = 25, sorted = 0). The same value as a full sort's, at a
    fraction of its cost in ONNX Runtime, where selection is most of a batch."""
    return torch.topk(x, REF // 2 + 1, dim=2, largest=False, sorted=False).values.amax(
        dim=2, keepdim=True)


def window_z(x: torch.Tensor, one_selection: bool = False, last: int | None = None) -> torch.Tensor:
    """Each channel of `x` [B, C, T] against its own median and MAD over the first REF ticks:
    a robust z-score that means the same on any service's scale. The scale has a floor (5 %
    of the channel's deviation, plus a constant) so a flat baseline does not divide by 0.
    one_selection: the mean absolute deviation from the median instead of the MAD (as a
    standard deviation: x 1.2533), one partial selection per channel instead of two.
    last: only the last `last` ticks' z-scores ([B, C, last]), the same values."""
    base = x[:, :, :REF]
    med = _middle(base)
    if one_selection:
        mad = (base - med).abs().mean(dim=2, keepdim=True) * 1.2533
    else:
        mad = _middle((base - med).abs()) * 1.4826
    scale = mad + 0.05 * base.std(dim=2, keepdim=True) + 1e-3
    return ((x if last is None else x[:, :, -last:]) - med) / scale


def robust_z(x: torch.Tensor) -> torch.Tensor:
    """window_z, clipped to [-20, 20]."""
    return window_z(x).clamp(-20.0, 20.0)


def baseline_spread(q: torch.Tensor, floor: float):
    """(median, scale) [B, C, 1] of the long baseline's quantiles `q` [B, C, 5]: the scale is
    the interquartile range as a standard deviation, plus 5 % of the 1-99 % range and `floor`,
    so a flat baseline does not divide by 0."""
    return q[:, :, 2:3], ((q[:, :, 3:4] - q[:, :, 1:2]) / 1.349
                          + 0.05 * (q[:, :, 4:5] - q[:, :, 0:1]) + floor)


class Scorer(nn.Module):
    """What the networks here share: the channels' risk orientation and the Platt scaling that
    turns a network's logit into p_anomaly."""

    # Whether the network also takes the long baseline (baseline.py): its input is then the
    # window with the baseline's rows after it, [B, 64 + 5, 8], and its ONNX export has the
    # two inputs the runtime feeds.
    takes_baseline = False

    def __init__(self):
        super().__init__()
        # Success is the one channel where lower is worse.
        sign = torch.ones(1, N_FEATURES, 1)
        sign[0, SUCCESS, 0] = -1.0
        self.register_buffer("risk_sign", sign)
        # Platt scaling, fitted on validation data at its natural base rate (train.calibrate):
        # p = sigmoid(scale * logit + shift) is then a probability the breaker's threshold can
        # mean something against.
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("shift", torch.tensor(0.0))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(window) * self.scale + self.shift)


class Net(Scorer):
    """`robust`: each channel also as a robust z-score against its own baseline (robust_z), and
    the head also reads the z-scores of the last ticks directly, oriented so that higher is
    worse: the network can lean on what a rolling robust z-score detector sees."""

    def __init__(self, hidden: int = 32, robust: bool = False):
        super().__init__()
        self.robust = robust
        c = (4 if robust else 3) * N_FEATURES
        self.conv = nn.Sequential(
            nn.Conv1d(c, hidden, 3, dilation=1), nn.ReLU(),
            nn.Conv1d(hidden, hidden, 3, dilation=2), nn.ReLU(),
            nn.Conv1d(hidden, hidden, 3, dilation=4), nn.ReLU(),
        )
        head_in = 2 * hidden + (2 * N_FEATURES if robust else 0)
        self.head = nn.Sequential(nn.Linear(head_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def logit(self, window: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(torch.clamp(window, min=0.0)).transpose(1, 2)  # [B, 8, 64]
        rel = x - x[:, :, :48].mean(dim=2, keepdim=True)
        d = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)
        # The head reads the last 16 outputs of the convolutions, which see only the last
        # 16 + 2 + 4 + 8 = 30 ticks: convolving just those is the same result at a third of the
        # cost (the first 48 ticks still set each channel's baseline above).
        channels = [x, rel, d]
        if self.robust:
            zs = robust_z(x)
            channels.append(zs / 10.0)
        h = self.conv(torch.cat(channels, dim=1)[:, :, -(TAIL + 14):])  # [B, hidden, 16]
        tail = h[:, :, -TAIL:]
        z = [tail[:, :, -4:].mean(dim=2), tail.amax(dim=2)]
        if self.robust:
            risk = zs * self.risk_sign / 10.0
            z += [risk[:, :, -1], risk[:, :, -4:].amax(dim=2)]
        return self.head(torch.cat(z, dim=1))


class ZNet(Scorer):
    """A small head over scale-free inputs only: each channel as a robust z-score against its
    own baseline (robust_z), oriented so that higher is worse, summarised over the last ticks
    (the last tick, the mean of the last 4, the peak of the last 8, and the trend: the last 4
    ticks against the 4 before them), and the worst channel's last z-score, which is what a
    robust z-score detector alarms on. A few hundred weights: too few to learn one service's
    levels, so what it learns is which channels and shapes precede an incident."""

    N_IN = 4 * N_FEATURES + 2

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.skip = nn.Linear(self.N_IN, 1)
        self.mlp = nn.Sequential(nn.Linear(self.N_IN, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def inputs(self, window: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(torch.clamp(window, min=0.0)).transpose(1, 2)  # [B, 8, 64]
        r = robust_z(x) * self.risk_sign / 10.0
        last4 = r[:, :, -4:].mean(dim=2)
        f = [r[:, :, -1], last4, r[:, :, -8:].amax(dim=2), last4 - r[:, :, -8:-4].mean(dim=2),
             r[:, :, -1].amax(dim=1, keepdim=True), r[:, :, -1].abs().amax(dim=1, keepdim=True)]
        return torch.cat(f, dim=1)

    def logit(self, window: torch.Tensor) -> torch.Tensor:
        f = self.inputs(window)
        return self.skip(f) + self.mlp(f)


class ZBNet(ZNet):
    """ZNet's inputs, and the same summaries of each channel against the class's long baseline
    (baseline.py: quantiles of its last 4,096 healthy ticks) instead of the window's first 48
    ticks: a robust z-score against the baseline's median and spread (the last tick, the mean of
    the last 4, the peak of the last 8), how far the last 3 ticks all stand past the baseline's
    bad tail (its 99 % quantile; 1 % for the success rate), and the worst channel of each. The
    window's z-score sees a local change (NAB's incidents); the long one sees a level the
    service is not usually at (a slow leak that began before the window, SMD's incidents)."""

    takes_baseline = True
    N_IN = ZNet.N_IN + 4 * N_FEATURES + 2

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        window, base = x[:, :WINDOW], x[:, WINDOW:]
        xl = torch.log1p(torch.clamp(window, min=0.0)).transpose(1, 2)  # [B, 8, 64]
        # log1p is monotone, so these are the quantiles of log1p(feature)
        q = torch.log1p(torch.clamp(base, min=0.0)).transpose(1, 2)  # [B, 8, 5]
        med, scale = baseline_spread(q, 1e-3)
        r = ((xl - med) / scale).clamp(-20.0, 20.0) * self.risk_sign / 10.0
        tail = torch.where(self.risk_sign > 0, q[:, :, 4:5], q[:, :, 0:1])
        over = ((xl[:, :, -3:] - tail) * self.risk_sign / scale).amin(dim=2).clamp(-20.0, 20.0) / 10.0
        f = [super().inputs(window), r[:, :, -1], r[:, :, -4:].mean(dim=2), r[:, :, -8:].amax(dim=2),
             over, r[:, :, -1].amax(dim=1, keepdim=True), over.amax(dim=1, keepdim=True)]
        return torch.cat(f, dim=1)


def squash(z: torch.Tensor) -> torch.Tensor:
    """A z-score on a scale a small network can read without losing the tail's order: about
    z / 3 near 0, logarithmic beyond, never clipped. A clip at some |z| makes every
    step past it equal, and at about one false trip a day the steps that matter are past any
    clip a healthy series' scores leave room for. (sign(z) log(1 + |z|): ONNX's exporter has no
    asinh.)"""
    return torch.sign(z) * torch.log1p(z.abs()) / 3.0


class ZCNet(ZBNet):
    """ZBNet's summaries with the z-scores squashed (`squash`) instead of clipped, so that the
    order of extreme steps survives, and three more that the classical detectors alarm on, read
    off the long baseline: each channel's z-score on the feature's own scale rather than its
    log (what a static robust z-score detector computes; the last tick, and the least of the
    last 3, oriented), the worst channel's two-sided z-score of the last tick, and each channel's
    distance past the baseline's bad tail over the last 3 ticks in log1p units, unscaled (a
    ratio to the 99th percentile, as the calibrated threshold rule reads p99 and failures)."""

    N_IN = 2 * (4 * N_FEATURES + 2) + 3 * N_FEATURES + 1
    # Whether the head also reads each channel against the window's own start (window_z: two
    # partial selections per channel, most of a batch's cost).
    WINDOW_BRANCH = True
    # Whether that branch's scale takes one partial selection per channel (window_z).
    ONE_SELECTION = False
    # The ticks the summaries read, the newest.
    LAST = 8

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        window, base = x[:, :WINDOW], x[:, WINDOW:]
        sign = self.risk_sign
        # [B, 8, 64]; without the window branch only the last LAST ticks are read
        xl = torch.log1p(torch.clamp(window if self.WINDOW_BRANCH else window[:, -self.LAST:],
                                     min=0.0)).transpose(1, 2)
        # the long baseline, on the log1p scale and on the feature's own
        q = torch.log1p(torch.clamp(base, min=0.0)).transpose(1, 2)  # [B, 8, 5]
        med, scale = baseline_spread(q, 1e-3)
        # the summaries read the last LAST ticks: only theirs are scored
        zl = (xl[:, :, -self.LAST:] - med) / scale
        tail = torch.where(sign > 0, q[:, :, 4:5], q[:, :, 0:1])
        past = (xl[:, :, -3:] - tail) * sign  # [B, 8, 3], log1p units
        raw = torch.clamp(window[:, -3:], min=0.0).transpose(1, 2)  # [B, 8, 3]
        med, scale = baseline_spread(torch.clamp(base, min=0.0).transpose(1, 2), 1e-6)
        zr = (raw - med) / scale
        f = []
        for z in ((window_z(xl, self.ONE_SELECTION, self.LAST), zl) if self.WINDOW_BRANCH else (zl,)):
            r = squash(z * sign)
            last4 = r[:, :, -4:].mean(dim=2)
            f += [r[:, :, -1], last4, r[:, :, -8:].amax(dim=2), last4 - r[:, :, -8:-4].mean(dim=2),
                  r[:, :, -1].amax(dim=1, keepdim=True),
                  squash(z[:, :, -1].abs()).amax(dim=1, keepdim=True)]
        rr = squash(zr * sign)
        f += [rr[:, :, -1], rr.amin(dim=2), squash(zr[:, :, -1].abs()).amax(dim=1, keepdim=True),
              past.amin(dim=2)]
        return torch.cat(f, dim=1)


class ZANet(ZCNet):
    """A robust z-score with a bounded learnt correction: the logit is a (prior + BOUND
    tanh(g)) + b, where the prior is the squashed worst two-sided z-score of the last tick's
    channels (log1p scale) against the class's long baseline, what a static robust z-score
    detector alarms on, and g is ZCNet's head over ZCNet's summaries. The head can reorder only
    steps whose priors lie within 2 BOUND of each other (a z-score about 2.5x apart near the
    tail), so a network trained on other services ranks a new one no worse than that z-score
    by much, and better where what it learnt holds."""

    BOUND = 0.15

    def __init__(self):
        super().__init__()
        self.log_a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(-3.0))

    def prior(self, x: torch.Tensor) -> torch.Tensor:
        window, base = x[:, :WINDOW], x[:, WINDOW:]
        xl = torch.log1p(torch.clamp(window[:, -1:], min=0.0)).transpose(1, 2)  # [B, 8, 1]
        q = torch.log1p(torch.clamp(base, min=0.0)).transpose(1, 2)  # [B, 8, 5]
        med, scale = baseline_spread(q, 1e-3)
        return squash(((xl - med) / scale).abs()).amax(dim=1)  # [B, 1]

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        f = self.inputs(x)
        g = self.skip(f) + self.mlp(f)
        return torch.exp(self.log_a) * (self.prior(x) + self.BOUND * torch.tanh(g)) + self.b


class ZALNet(ZANet):
    """ZANet without the window branch: the head reads the long baseline's summaries only."""

    WINDOW_BRANCH = False
    N_IN = ZCNet.N_IN - (4 * N_FEATURES + 2)


class ZAMNet(ZANet):
    """ZANet whose window branch scales by the mean absolute deviation (one partial selection
    per channel rather than two)."""

    ONE_SELECTION = True


class ZSNet(ZANet):
    """ZANet whose prior is a scan over a few lengths: for each channel, the mean of its last
    k ticks' z-scores against the long baseline (signed, so a deviation that holds adds up and
    noise cancels), times sqrt(k), the largest over k in SCALES and over the channels,
    squashed; ticks the runtime zero-padded the window with are left out of the means. For
    noise independent from tick to tick every term has the spread of a single tick's z-score,
    so a one-tick spike and a smaller shift held for k ticks are compared on one scale (the
    standardised means of a scan statistic); with k = 1 alone it is ZANet's."""

    SCALES = (1, 3, 8)

    def __init__(self):
        super().__init__()
        last = max(self.SCALES)
        pick = torch.zeros(last, len(self.SCALES))
        for j, k in enumerate(self.SCALES):
            pick[last - k:, j] = 1.0
        self.register_buffer("_pick", pick, persistent=False)

    def prior(self, x: torch.Tensor) -> torch.Tensor:
        window, base = x[:, :WINDOW], x[:, WINDOW:]
        last = max(self.SCALES)
        xl = torch.log1p(torch.clamp(window[:, -last:], min=0.0)).transpose(1, 2)  # [B, 8, last]
        q = torch.log1p(torch.clamp(base, min=0.0)).transpose(1, 2)  # [B, 8, 5]
        med, scale = baseline_spread(q, 1e-3)
        # The runtime zero-pads the window while a class's history is short: a padded tick
        # (every feature 0; a real one has a success rate, 1 when idle) is no evidence, and
        # each mean is over the real ticks among its last k, standardised by their number.
        real = (window[:, -last:].abs().sum(dim=2, keepdim=True) > 0).to(x.dtype)  # [B, last, 1]
        z = (xl - med) / scale  # [B, 8, last]
        # The sums over the last k ticks, every k at once: one product with a [last, K]
        # matrix of ones in each column's last k rows (a few graph nodes, not a few per k).
        pick = self._pick.to(x.dtype)
        sums = torch.matmul(z * real.transpose(1, 2), pick)  # [B, 8, K]
        n = torch.matmul(real.transpose(1, 2), pick).clamp(min=1.0)  # [B, 1, K]
        terms = self.weigh(sums.abs() / torch.sqrt(n))
        return squash(terms.amax(dim=2)).amax(dim=1, keepdim=True)  # [B, 1]

    def weigh(self, terms: torch.Tensor) -> torch.Tensor:
        """Each channel's scan terms [B, 8, K] as the prior compares them (as they are)."""
        return terms


class ZSLNet(ZSNet):
    """ZSNet without the window branch (as ZALNet is ZANet without it): the head reads the long
    baseline's summaries only, and a batch takes no partial selection at all."""

    WINDOW_BRANCH = False
    N_IN = ZALNet.N_IN


class ZSWNet(ZSLNet):
    """ZSLNet whose scan weighs each channel by a learnt positive factor (exp of a parameter,
    1 to begin with) before the largest is taken: eight weights that say which channels' shifts
    precede incidents."""

    def __init__(self):
        super().__init__()
        self.channel_log_w = nn.Parameter(torch.zeros(1, N_FEATURES, 1))

    def weigh(self, terms: torch.Tensor) -> torch.Tensor:
        return terms * torch.exp(self.channel_log_w)


class _WithBaseline(nn.Module):
    """A ZBNet as the runtime calls it: the window and the baseline as two inputs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, window: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([window, base], dim=1))


# Each architecture's name (train.py's --arch) and how to build it.
_BUILD = {
    "conv": Net,  # the bundled model's until 1 December 2026
    "robust": lambda: Net(robust=True),
    "z": ZNet,
    "zb": ZBNet,
    "zc": ZCNet,
    "za": ZANet,  # the bundled model's until 2 December 2026
    "zal": ZALNet,
    "zam": ZAMNet,
    "zs": ZSNet,  # the bundled model's until 2 December 2026 (evening)
    "zsl": ZSLNet,  # the bundled model's
    "zsw": ZSWNet,
}
ARCHS = tuple(_BUILD)


def build(arch: str) -> nn.Module:
    """The network named `arch`, one of ARCHS."""
    if arch in _BUILD:
        return _BUILD[arch]()
    raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")


def export(net: nn.Module, path: str) -> None:
    """Write `net` to `path` as ONNX, its input features named in the file's metadata
    (`features.METADATA_KEY`; `OnnxPredictor` checks them against the Rust list), and for a
    network that takes the long baseline, the baseline's input and metadata entry."""
    net.eval()
    args, names, extra = (torch.zeros(1, WINDOW, N_FEATURES),), ["window"], {}
    if net.takes_baseline:
        args += (torch.zeros(1, baseline.N_QUANTILES, N_FEATURES),)
        names.append(baseline.INPUT_NAME)
        extra[baseline.METADATA_KEY] = baseline.METADATA_VALUE
        net = _WithBaseline(net)
    torch.onnx.export(
        net, args, path, input_names=names, output_names=["p_anomaly"],
        dynamic_axes={**{n: {0: "batch"} for n in names}, "p_anomaly": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    features.stamp(path, extra)
