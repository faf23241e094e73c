"""Model registry: ``create_model(name, num_classes, input_shape, **kw)``.

Every model adapts to any input channels, size and class count. The recipe that
rebuilds a model (name, classes, input shape, keyword arguments) is attached to it
as ``model.mcp_recipe`` so that a saved ``state_dict`` can be reloaded anywhere.
"""

from mcp.models.registry import (
    create_model,
    model_from_recipe,
    model_info,
    model_names,
    register_model,
)

# Importing the definitions fills the registry.
from mcp.models import cifar_resnet, classic, tiny, torchvision_family  # noqa: F401,E402

__all__ = ["create_model", "model_from_recipe", "model_info", "model_names", "register_model"]
