"""The named CNN architectures, and the wrapper that turns one into a servable model.

Every network takes a normalised (N, 1, 28, 28) batch and returns (N, 10) logits.

Each net max-pools before its ReLU, not after: the two commute (both keep the largest value),
so the function and its gradients are exactly those of the usual conv -> ReLU -> pool, but the
ReLU and its backward pass touch a quarter of the values (docs/results.md, Pooling before the ReLU).
"""
import torch
from torch import nn


def baseline() -> nn.Module:
    """The progressive runs' Run 1: Conv32 -> max pool -> dense 10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 13 * 13, 10),
    )


def enhanced() -> nn.Module:
    """The progressive runs' Runs 2 and 3: Conv64 -> pool -> dropout .25 -> dense 128 -> dropout .5 -> dense 10."""
    return nn.Sequential(
        nn.Conv2d(1, 64, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(64 * 13 * 13, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10),
    )


def cnn_bn() -> nn.Module:
    """Two conv layers with batch norm, max pool, dropout, two dense layers."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.MaxPool2d(2), nn.ReLU(),
        nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10),
    )


def simple() -> nn.Module:
    """The net of pytorch/examples mnist: conv32, conv64, dense 128, dropout .25."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.ReLU(),
        nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, 10),
    )


def _conv_bn(c_in: int, c_out: int, stride: int = 1, pool: bool = False) -> list[nn.Module]:
    # No conv bias: the batch norm right after it has its own.
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
            *([nn.MaxPool2d(2)] if pool else []), nn.ReLU(inplace=True)]


def _strided_cnn(c1: int, c2: int, c3: int, c4: int) -> nn.Module:
    """Four conv + batch norm layers with channels c1..c4: the shape of `fast` and `wide`."""
    return nn.Sequential(
        *_conv_bn(1, c1, stride=2), *_conv_bn(c1, c2, pool=True),  # 28 -> 14 -> 7
        *_conv_bn(c2, c3, pool=True),                              # 7 -> 3
        *_conv_bn(c3, c4),
        nn.Flatten(), nn.Linear(c4 * 3 * 3, 10),
    )


def fast() -> nn.Module:
    """The default for MNIST: chosen for test accuracy per second of CPU training (docs/train.md, Models).

    Full-resolution layers are what cost time on a CPU, so a stride-2 stem halves the image at
    once and width grows only as the image shrinks; batch norm lets the one-cycle schedule use a
    high learning rate; no dropout, whose random masks are slow on a CPU.
    """
    return _strided_cnn(16, 32, 96, 160)


def wide() -> nn.Module:
    """The default for Fashion-MNIST: `fast` with more channels, at about half its speed.

    Fashion-MNIST's classes differ in texture and small detail, and `fast` has too few
    channels to reach 93 % in 5 epochs; this net does (docs/results.md, Fashion-MNIST).
    """
    return _strided_cnn(32, 64, 128, 192)


MODELS = {"fast": fast, "wide": wide, "baseline": baseline, "enhanced": enhanced, "cnn_bn": cnn_bn,
          "simple": simple}


class Mirrored(nn.Module):
    """A net for classes whose mirror image keeps its label (clothes and shoes; not digits).

    In training, a random half of each batch is mirrored left-right, so the net learns both views
    (the torch RNG draws it, so seeded runs and resumed runs repeat it). In prediction, the net's
    logits for an image and for its mirror image are averaged (test-time augmentation).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mirror = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
            return self.net(torch.where(mirror, x.flip(3), x))
        return (self.net(x) + self.net(x.flip(3))) / 2


def build(name: str, mirror: str = "off") -> nn.Module:
    """The named net; wrapped in Mirrored when `mirror` is "on" (a validated TrainConfig.mirror)."""
    net = MODELS[name]()
    return Mirrored(net) if mirror == "on" else net


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summary(model: nn.Module) -> str:
    """One line per layer with its output shape and parameter count, for a (1, 1, 28, 28) input."""
    lines = [f"{'layer':<40}{'output shape':>20}{'params':>12}"]
    layers = model.net if isinstance(model, Mirrored) else model
    x = torch.zeros(1, 1, 28, 28)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            x = layer(x)
            n = sum(p.numel() for p in layer.parameters())
            lines.append(f"{f'{i}: {layer}':<40.40}{str(tuple(x.shape)):>20}{n:>12,}")
    model.train(was_training)
    if layers is not model:
        lines.append("(Mirrored: trained on random mirror images; predicts the mean of both views)")
    lines.append(f"{'total':<40}{'':>20}{count_params(model):>12,}")
    return "\n".join(lines)


class Normalize(nn.Module):
    """Applies the training data's normalisation, so served models take raw [0, 1] pixels."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def servable(net: nn.Module, mean: float, std: float) -> nn.Module:
    """(N, 1, 28, 28) pixels in [0, 1] -> (N, 10) class probabilities."""
    return nn.Sequential(Normalize(mean, std), net, nn.Softmax(dim=1)).eval()
