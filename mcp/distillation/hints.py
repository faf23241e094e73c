"""Hint (feature) losses between intermediate layers (FitNets, Romero et al. 2015).

A pair ``student_layer=teacher_layer`` matches the outputs of two modules; ``auto``
matches the penultimate features, the inputs of each model's last ``nn.Linear``. Where
the widths differ, a learned adapter (1x1 convolution for feature maps, linear layer
for vectors) maps the student's features to the teacher's width; where the spatial
sizes differ, both maps are average-pooled to the smaller one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mcp.errors import ConfigError

AUTO = "auto"
PENULTIMATE = "<penultimate>"


@dataclass(frozen=True)
class HintPair:
    student: str
    teacher: str


def parse_hint_layers(text: str) -> list[HintPair]:
    """``""`` (none), or comma-separated items: ``auto`` (the penultimate features) or
    ``student_layer=teacher_layer``."""
    text = text.strip()
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        if item.strip() == AUTO:
            pairs.append(HintPair(PENULTIMATE, PENULTIMATE))
            continue
        parts = [p.strip() for p in item.split("=")]
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"hint_layers item {item.strip()!r} is not student_layer=teacher_layer; "
                              f"use 'auto' or pairs such as 'fc2=layer3'")
        pairs.append(HintPair(*parts))
    return pairs


def _penultimate(model: nn.Module) -> tuple[str, nn.Module]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"hint_layers=auto needs a final nn.Linear classifier; {type(model).__name__} has none")
    return linears[-1]


def _module(model: nn.Module, name: str, role: str) -> tuple[str, nn.Module, bool]:
    """(name, module, tap its input) for a layer name of the ``role`` model."""
    if name == PENULTIMATE:
        found, module = _penultimate(model)
        return found, module, True
    modules = dict(model.named_modules())
    if not name or name not in modules:
        names = [n for n in modules if n]
        shown = ", ".join(names[:25]) + (", ..." if len(names) > 25 else "")
        raise ConfigError(f"hint layer {name!r} is not a module of the {role} ({type(model).__name__}); "
                          f"its modules: {shown}")
    return name, modules[name], False


class FeatureTap:
    """Keeps the latest output (or input) of a module, through a forward hook."""

    def __init__(self, module: nn.Module, use_input: bool):
        self.value: torch.Tensor | None = None
        if use_input:
            self.handle = module.register_forward_pre_hook(self._pre)
        else:
            self.handle = module.register_forward_hook(self._post)

    def _pre(self, module, args):
        self.value = args[0]

    def _post(self, module, args, output):
        self.value = output

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if not isinstance(value, torch.Tensor):
            raise RuntimeError("a hint layer did not run in the forward pass (or does not return one tensor)")
        return value

    def remove(self) -> None:
        self.handle.remove()
        self.value = None


def _match(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two feature tensors to comparable shapes, but for the channel width."""
    if student.dim() == 4 and teacher.dim() == 4:
        size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
        if tuple(student.shape[2:]) != size:
            student = F.adaptive_avg_pool2d(student, size)
        if tuple(teacher.shape[2:]) != size:
            teacher = F.adaptive_avg_pool2d(teacher, size)
        return student, teacher

    def vector(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)

    return vector(student), vector(teacher)


class HintLoss(nn.Module):
    """Mean-squared error between (adapted) student features and teacher features.

    Holds the adapters (their parameters must be trained with the student) and the
    forward hooks on both models; call :meth:`remove` before the student is saved."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Sequence[HintPair],
                 input_shape: Sequence[int]):
        super().__init__()
        resolved = [(_module(student, p.student, "student"), _module(teacher, p.teacher, "teacher")) for p in pairs]
        self.pairs = [HintPair(s[0], t[0]) for s, t in resolved]
        self.student_taps = [FeatureTap(s[1], s[2]) for s, _ in resolved]
        self.teacher_taps = [FeatureTap(t[1], t[2]) for _, t in resolved]
        self.adapters = nn.ModuleList()
        try:
            shapes = self._probe(student, teacher, input_shape)
        except BaseException:
            self.remove()
            raise
        for pair, (s, t) in zip(self.pairs, shapes):
            s, t = _match(torch.zeros(s), torch.zeros(t))
            if s.dim() != t.dim():
                raise ConfigError(f"hint {pair.student}={pair.teacher}: features of shapes {list(s.shape[1:])} "
                                  f"and {list(t.shape[1:])} cannot be matched")
            cs, ct = s.shape[1], t.shape[1]
            if cs == ct:
                self.adapters.append(nn.Identity())
            elif s.dim() == 4:
                self.adapters.append(nn.Conv2d(cs, ct, kernel_size=1, bias=False))
            else:
                self.adapters.append(nn.Linear(cs, ct, bias=False))

    @torch.no_grad()
    def _probe(self, student: nn.Module, teacher: nn.Module, input_shape) -> list[tuple[tuple, tuple]]:
        states = student.training, teacher.training
        student.eval(), teacher.eval()
        device = next(student.parameters()).device
        x = torch.zeros(2, *input_shape, device=device)
        try:
            student(x)
            teacher(x.to(next(teacher.parameters()).device))
            out = []
            for pair, s_tap, t_tap in zip(self.pairs, self.student_taps, self.teacher_taps):
                try:
                    out.append((tuple(s_tap.take().shape), tuple(t_tap.take().shape)))
                except RuntimeError:
                    raise ConfigError(f"hint {pair.student}={pair.teacher}: a layer does not produce one tensor "
                                      f"in the forward pass") from None
            return out
        finally:
            student.train(states[0]), teacher.train(states[1])

    def forward(self) -> torch.Tensor:
        """The loss over the features the latest student and teacher forward passes left."""
        total = None
        for adapter, s_tap, t_tap in zip(self.adapters, self.student_taps, self.teacher_taps):
            s, t = _match(s_tap.take(), t_tap.take())
            term = F.mse_loss(adapter(s), t.detach())
            total = term if total is None else total + term
        return total / len(self.adapters)

    def remove(self) -> None:
        for tap in (*self.student_taps, *self.teacher_taps):
            tap.remove()
