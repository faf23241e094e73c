"""The shipped search spaces: YAML files (data, not code) that define what ``mcp search``
may sample, installed with the package. Name one by its name (``--space structured``,
``mcp.search(..., space="structured")``) or give a path to a YAML file of your own:

- ``default``: any model; every prunable layer gets its own prune ratio and bit-width;
- ``structured``: any model, channels removed (structured); for ``--budget-on onnx``;
- ``lenet``: LeNet-300-100 and LeNet-5 (every layer any ratio up to 99.9% and any
  bit-width, so every uniform recipe is inside);
- ``resnet``: CIFAR and torchvision ResNets, one ratio and bit-width per stage;
- ``resnet_latency``: CIFAR ResNets under a latency budget (``--budget-ms``): channels and
  whole residual blocks removed.

With no ``--space``, ``mcp search`` takes the file whose ``models`` lists the model, else
``default``. The keys are documented in :mod:`mcp.tuner.space`; unknown keys, unknown
layers, empty ranges and bits outside 2-8 are errors.
"""
