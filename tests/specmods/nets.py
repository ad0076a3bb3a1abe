"""Small user models decorated with ``record_init``, as a user's own package would define them."""

from __future__ import annotations

import torch
from torch import nn

from registry.spec import record_init


@record_init
class TinyNet(nn.Module):
    """Linear, a caller-chosen activation module, dropout, then a linear head."""

    def __init__(self, sizes: list[int], act: nn.Module, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(sizes[0], sizes[1]), act, nn.Dropout(dropout))
        self.head = nn.Linear(sizes[1], sizes[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@record_init
class Base(nn.Module):
    """A decorated base class."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@record_init
class Wide(Base):
    """A decorated subclass: its own arguments are recorded, not those it passes to Base."""

    def __init__(self, width: int, factor: int = 2) -> None:
        super().__init__(width * factor)
        self.factor = factor


class Undecorated(Base):
    """A subclass that forgot the decorator: its base's recorded arguments must not be used."""

    def __init__(self) -> None:
        super().__init__(3)


class Plain(nn.Module):
    """A user class without the decorator."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


@record_init
class Stack(nn.Module):
    """Variadic positional modules plus a keyword with a non-JSON default."""

    def __init__(self, width: int, *blocks: nn.Module, act: type[nn.Module] = nn.Tanh, gain: float = 1.0) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(blocks)
        self.act = act()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.inp(x))
        for block in self.blocks:
            x = block(x)
        return x * self.gain


@record_init
class Positional(nn.Module):
    """Arguments that may only be passed by position, and one named ``target``."""

    def __init__(self, n: int, m: int, /, scale: float = 1.0, target: str = "out") -> None:
        super().__init__()
        self.fc = nn.Linear(n, m)
        self.scale = scale
        self.target = target  # a keyword argument named like the spec key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


@record_init
class WithBuffer(nn.Module):
    """A non-persistent buffer and a plain tensor attribute computed in __init__: not in the state_dict."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.register_buffer("scale", torch.arange(1, n + 1, dtype=torch.float32), persistent=False)
        self.offset = torch.full((n,), 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale + self.offset


@record_init
class Tied(nn.Module):
    """An embedding and an output projection sharing one weight."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x))


@record_init
class DataDependent(nn.Module):
    """A constructor that reads tensor values, which meta tensors cannot do (like timm's drop-path rates)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        rates = [round(r.item(), 3) for r in torch.linspace(0.0, 0.5, depth)]
        self.layers = nn.ModuleList(nn.Dropout(r) for r in rates)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.fc(x)


class Outer:
    """A namespace class: nested classes are captured by their qualified name."""

    @record_init
    class Inner(nn.Module):
        """A decorated class nested in another class."""

        def __init__(self, n: int) -> None:
            super().__init__()
            self.fc = nn.Linear(n, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)


# Re-exported from an untrusted module: reachable through this module, but not trusted by it.
from collections import OrderedDict as ReExported  # noqa: E402, F401


@record_init
class Scaled(nn.Module):
    """A linear layer scaled by a non-persistent buffer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.register_buffer("scale", torch.ones(width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale
