"""Torch-Pruning pruners for modules whose channels its dependency graph cannot follow.

timm's Swin merges 2x2 neighbouring patches by reshaping ``(B, H, W, C)`` into
``(B, H/2, W/2, 4C)`` (``PatchMerging``): channel ``c`` of its input appears four times in
the merged vector, at ``c + k*C`` for ``k`` in 0..3, which the traced graph cannot map.
Handled as one unit, as Torch-Pruning's own Swin example does for Hugging Face's Swin:
pruning an input channel removes its four copies from the LayerNorm and the reduction
``Linear``; pruning an output channel removes the reduction's output.

Torch-Pruning is imported when a pruner is made (it imports timm and torchvision).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def _is_patch_merging(module: nn.Module) -> bool:
    kind = type(module)
    return (kind.__name__ == "PatchMerging" and kind.__module__.startswith("timm.")
            and isinstance(getattr(module, "reduction", None), nn.Linear)
            and isinstance(getattr(module, "norm", None), nn.LayerNorm) and isinstance(getattr(module, "dim", None), int)
            and module.reduction.in_features == 4 * module.dim)


def _patch_merging_pruner():
    import torch_pruning as tp

    class PatchMergingPruner(tp.BasePruningFunc):
        """timm's ``PatchMerging`` as one layer: ``dim`` inputs, ``reduction``'s outputs."""

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            tp.prune_linear_out_channels(layer.reduction, idxs)
            layer.out_dim = layer.reduction.out_features
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            copies = [int(i) + k * layer.dim for k in range(4) for i in idxs]  # the 2x2 patches, channel-major
            tp.prune_linear_in_channels(layer.reduction, copies)
            tp.prune_layernorm_out_channels(layer.norm, copies)
            layer.dim -= len(idxs)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.reduction.out_features

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.dim

    return PatchMergingPruner()


def custom_pruners(model: nn.Module) -> dict[type, object]:
    """The pruners ``model`` needs beyond Torch-Pruning's own: module type -> pruner."""
    kinds = {type(m) for m in model.modules() if _is_patch_merging(m)}
    if not kinds:
        return {}
    pruner = _patch_merging_pruner()
    return {kind: pruner for kind in kinds}


def graph_options(model: nn.Module) -> dict:
    """Keyword arguments for Torch-Pruning's pruners: the custom pruners ``model`` needs, and
    their module types as roots of pruning groups (their outputs start new groups)."""
    custom = custom_pruners(model)
    if not custom:
        return {}
    defaults = [nn.modules.conv._ConvNd, nn.Linear, nn.LSTM]  # Torch-Pruning's own roots
    return {"customized_pruners": custom, "root_module_types": [*defaults, *custom]}


def graph_build_options(model: nn.Module) -> dict:
    """The same for ``DependencyGraph.build_dependency`` (which takes no roots)."""
    custom = custom_pruners(model)
    return {"customized_pruners": custom} if custom else {}
