"""Model classes for the torch tests (imported only after torch is known to be installed)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, ClassVar

import torch
from torch import nn

import mlpersist

INIT_DEVICES: list[str] = []


class MLP(nn.Module):
    """Arguments recovered from attributes of the same name."""

    def __init__(self, n_in: int, hidden: int = 16, n_out: int = 3) -> None:
        super().__init__()
        self.n_in, self.hidden, self.n_out = n_in, hidden, n_out
        self.l1, self.bn, self.l2 = nn.Linear(n_in, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, n_out)
        INIT_DEVICES.append(self.l1.weight.device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.bn(self.l1(x))))


@mlpersist.capture_init
class Captured(nn.Module):
    """Arguments recorded by capture_init, positional and keyword, none kept as attributes."""

    def __init__(self, sizes: tuple[int, ...], activation: str = "relu", *, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b, dtype=dtype), nn.ReLU() if activation == "relu" else nn.Tanh()]
        self.body = nn.Sequential(*layers, nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@dataclasses.dataclass
class Config:
    vocab: int
    dim: int
    blocks: list[int] = dataclasses.field(default_factory=lambda: [8, 8])


class ConfigNet(nn.Module):
    """A nested-config argument (a dataclass) plus a dict of options; tied input/output embeddings."""

    def __init__(self, config: Config, options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config, self.options = config, options or {}
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.mid = nn.Sequential(*[nn.Linear(config.dim, config.dim) for _ in config.blocks])
        self.head = nn.Linear(config.dim, config.vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.tensor(float(self.options.get("scale", 1.0))))
        self.register_buffer("transposed", torch.arange(6.0).reshape(2, 3).t())  # non-contiguous

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.embed(tokens)) * self.scale)


class Opaque(nn.Module):
    """Built from an argument kept under another name: mlpersist cannot find it, so loading needs a template."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.inner = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Head(nn.Module):
    """A module argument kept under its own name, as most models that wrap a backbone do."""

    def __init__(self, backbone: nn.Module, n_out: int = 2) -> None:
        super().__init__()
        self.backbone, self.n_out = backbone, n_out
        self.fc = nn.Linear(backbone[-1].out_features, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.backbone(x)))


@mlpersist.capture_init
class Weighted(nn.Module):
    """A tensor argument the module keeps as a buffer: recorded by shape, its values in the weights."""

    def __init__(self, class_weight: torch.Tensor, n_in: int = 4) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.total = float(class_weight.sum())  # computed from the values when built: they must be the saved ones
        self.lin = nn.Linear(n_in, len(class_weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.class_weight / self.total


@mlpersist.capture_init
class Scaled(nn.Module):
    """A tensor argument used and not kept: its values are nowhere in the weights, so it cannot be recorded."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.factor = float(scale.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.factor


class WithCache(nn.Module):
    """A non-persistent buffer: not in the state dict, so a meta build cannot fill it."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.n = n
        self.lin = nn.Linear(n, n)
        self.register_buffer("cache", torch.ones(n) * 2, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.cache


class NotAModule:
    """Constructing it would leave a trace: the tests check it never is."""

    built: ClassVar[list[int]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        NotAModule.built.append(1)


class Named(nn.Module):
    """An argument that names the child it builds: the child is not the argument, so the default is used."""

    def __init__(self, encoder: str = "linear") -> None:
        super().__init__()
        self.encoder = {"linear": nn.Linear(3, 3), "conv": nn.Conv1d(1, 1, 3)}[encoder]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class Unsaved(nn.Module):
    """A tensor argument kept as a buffer outside the state dict: its values are in no file, so not recorded."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale, persistent=False)
        self.lin = nn.Linear(len(scale), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.scale)


class Symmetric(nn.Module):
    """A user's own parametrization (torch's tutorial): mlpersist records none of these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


class Stack(nn.Module):
    """A constructor that loops on a count: `depth` layers."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.width, self.depth = width, depth
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Stubborn(Stack):
    """The same loop, going on past any error its layers raise."""

    def __init__(self, width: int, depth: int) -> None:
        nn.Module.__init__(self)
        self.width, self.depth = width, depth
        self.layers = nn.ModuleList()
        for _ in range(depth):
            try:
                self.layers.append(nn.Linear(width, width))
            except Exception:  # the point of this class
                continue
