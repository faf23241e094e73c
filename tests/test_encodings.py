"""Encodings as per-layer choices: k-means codebooks (Huffman-coded where it pays) beside
uniform grids in one model, in the search space, sized exactly before fine-tuning, decoded
from the payload in a fresh process, and `--deployable int8` keeping a search to grids."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mcp import tracking
from mcp.config import SearchConfig, TrainConfig
from mcp.errors import ConfigError
from mcp.models import create_model
from mcp.quantization import Codebook, QuantSpec, Quantizer, Uniform, decode, encode_model
from mcp.quantization.codec import inference_state
from mcp.stages.search import run_search
from mcp.stages.train import run_train
from mcp.tuner.space import build_space
from mcp.tuner.study import int8_only

TINY = dict(dataset="synthetic", input_shape="3x8x8", num_classes=4)
SHAPE = (3, 8, 8)
LENET = ["fc1", "fc2", "fc3"]


@pytest.fixture(autouse=True)
def _own_registry(own_store):
    """Each test registers its own versions."""


def _pruned_mlp(sparsity: float = 0.7) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("tiny_mlp", 4, SHAPE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                cut = m.weight.abs().flatten().kthvalue(int(sparsity * m.weight.numel())).values
                m.weight[m.weight.abs() <= cut] = 0
    return model


def test_a_grid_method_takes_codebooks_in_named_layers_and_their_huffman_size_holds_through_fine_tuning():
    model = _pruned_mlp()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    spec = QuantSpec(method="qat", bits=4, codebook_layers=(names[0],))
    quantizer = Quantizer(model, SHAPE, spec)
    before = {k: tuple(t.clone() for t in e) for k, e in quantizer.sharing.codebooks().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the centroids are parameters: they train
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, *SHAPE)).logsumexp(1).mean().backward()
        opt.step()
    quantizer.freeze()
    entries = quantizer.finish()
    first = entries[f"{names[0]}.weight"]
    assert isinstance(first, Codebook) and all(isinstance(entries[f"{n}.weight"], Uniform) for n in names[1:])
    centroids, labels, mask = before[f"{names[0]}.weight"]
    assert np.array_equal(first.labels, labels.numpy()) and np.array_equal(first.mask, mask.numpy())
    assert not np.allclose(first.centroids, centroids.numpy())  # fine-tuned centroids, labels and zeros fixed
    codings = spec.codings(entries)
    assert codings[f"{names[0]}.weight"] == "huffman" and codings[f"{names[1]}.weight"] == "fixed"
    payload = encode_model(model, entries, codings)
    fixed = encode_model(model, entries, "fixed")
    assert len(payload) < len(fixed)  # the codebook's indices and sparse gaps entropy-coded
    weight = dict(model.named_modules())[names[0]].weight.detach().numpy()
    decoded = decode(payload)
    keys = list(inference_state(model))
    assert np.array_equal(decoded[keys.index(f"{names[0]}.weight")], weight)  # bit for bit
    assert len(np.unique(weight[weight != 0])) <= 16
    assert quantizer.describe()["codebook_layers"] == [names[0]]


def test_a_trial_may_give_its_codebook_layers_biases_codebooks_of_their_own_sized_exactly():
    from mcp.tuner.space import uniform
    from mcp.tuner.trial import finetune_quantized, measure_sizes

    model = _pruned_mlp(0.9)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    space = build_space({"prune": {"ratio": [0.0, 0.95]}, "quantize": {"bits": [2, 3], "encoding": ["codebook"],
                                                                       "share_biases": [True, False]}},
                        names, "s.yaml")
    assert space.share_biases == (True, False)
    shared = uniform(space, 0.9, 2, 1, 0.01)
    assert shared.share_biases  # uniform starts: the first choice
    plain = dataclasses.replace(shared, share_biases=False)
    sizes = {tc.share_biases: measure_sizes(model, SHAPE, tc)["size_bytes_compressed"] for tc in (shared, plain)}
    assert sizes[True] < sizes[False]  # 2-bit codes instead of float32 biases
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, *SHAPE, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 4, (64,), generator=g)),
                                         batch_size=16)
    tuned = finetune_quantized(model, SHAPE, shared, (loader, loader, loader), "cpu")
    assert len(tuned.payload) == sizes[True]  # labels fixed while the centroids trained: the size held
    for name in names:
        bias = dict(tuned.model.named_modules())[name].bias.detach()
        assert len(bias[bias != 0].unique()) <= 4
        assert isinstance(tuned.entries[f"{name}.bias"], Codebook)
    with pytest.raises(ConfigError, match="quantize.share_biases=\\['auto'\\] must be a non-empty list of true"):
        build_space({"quantize": {"encoding": ["codebook"], "share_biases": ["auto"]}}, LENET, "s.yaml")
    with pytest.raises(ConfigError, match="gives codebook layers' biases codebooks: no layer may take encoding "
                                          "codebook"):
        build_space({"quantize": {"share_biases": [True]}}, LENET, "s.yaml")


def test_codebooks_on_a_method_that_shares_or_is_int8_are_refused():
    for method in ("kmeans", "ptq_int8"):
        with pytest.raises(ConfigError, match=f"codebook layers \\(fc1\\) mix k-means codebooks into a grid method "
                                              f"\\(fixed_point, qat\\), not {method}"):
            QuantSpec(method=method, codebook_layers=("fc1",)).validate()


def test_the_space_takes_encodings_per_layer_and_checks_them():
    space = build_space({"prune": {"ratio": [0.0, 0.9]}, "quantize": {"bits": [2, 4], "encoding": ["codebook", "grid"],
                                                                      "kmeans_init": ["linear", "density"]},
                         "layers": {"fc3": {"encoding": ["grid"]}}}, LENET, "s.yaml")
    assert space.encodings_of("fc1") == ("codebook", "grid") and space.encodings_of("fc3") == ("grid",)
    assert space.codebooks and space.kmeans_init == ("linear", "density")
    with pytest.raises(ConfigError, match="quantize.encoding: 'huffman' is not allowed; choose from: grid, codebook"):
        build_space({"quantize": {"encoding": ["huffman"]}}, LENET, "s.yaml")
    with pytest.raises(ConfigError, match="codebook shares the weights a layer keeps; it needs granularity "
                                          "\\[unstructured\\] alone"):
        build_space({"prune": {"granularity": ["structured"]}, "quantize": {"encoding": ["codebook"]}}, LENET, "s.yaml")
    grids = int8_only(space)
    assert all(grids.encodings_of(u) == ("grid",) for u in grids.units)
    only = build_space({"quantize": {"encoding": ["grid"]}, "layers": {"fc2": {"encoding": ["codebook"]}}}, LENET,
                       "s.yaml")
    with pytest.raises(ConfigError, match="--deployable int8 keeps uniform grids only, but fc2 allows only codebook"):
        int8_only(only)


CODEBOOK_SPACE = """
prune: {ratio: [0.5, 0.9]}
quantize: {bits: [2, 3], encoding: [codebook]}
finetune: {epochs: [2, 2], lr: [0.01, 0.01]}
"""


def test_a_codebook_search_winner_is_a_storage_format_that_decodes_identically_in_a_fresh_process(
        experiment, tmp_path):
    run_train(TrainConfig(model="tiny_mlp", epochs=6, **TINY), show_progress=False)
    space = tmp_path / "space.yaml"
    space.write_text(CODEBOOK_SPACE)
    cfg = SearchConfig(model="tiny_mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=3, pruner="none",
                       budget_ratio=0.05, space=str(space), export=False, benchmark=False, **TINY)
    result = run_search(cfg, show_progress=False)
    for t in result.trials:
        if t["state"] == "complete":  # sized before fine-tuning, exactly: the codebooks' labels did not move
            assert t["size_bytes_compressed"] <= result.budget_bytes
    (winner,) = result.winners
    uri = f"models:/tiny_mlp-synthetic/{winner['version']}"
    tags = MlflowClient().get_model_version("tiny_mlp-synthetic", winner["version"]).tags
    layers = tags["codebook_layers"].split(",")
    assert layers and set(layers) <= set(json.loads(tags["bits"])) and "storage and download format" in tags["storage"]
    assert winner["size_bytes_compressed"] <= result.budget_bytes
    note = MlflowClient().get_run(winner["run_id"]).data.tags["mcp.deploy_note"]
    assert f"{layers[0]}" in note and "in float32, decoded from their k-means codebooks" in note
    registered = tracking.load_model(uri)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = registered(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys, numpy as np, torch; from mcp.tracking.models import load_payload; "
            f"m = load_payload({uri!r}); x = torch.from_numpy(np.load(sys.argv[1])); "
            "np.save(sys.argv[2], m(x).detach().numpy())")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], check=True)
    assert np.array_equal(np.load(tmp_path / "y.npy"), expected)  # decoded from the payload alone, identical
    for name in layers:  # each codebook layer holds at most 2^bits distinct non-zero values
        w = dict(registered.named_modules())[name].weight.detach()
        assert len(w[w != 0].unique()) <= 2 ** json.loads(tags["bits"])[name]


def test_deployable_int8_keeps_the_search_to_grids_that_onnx_runtime_runs(experiment, tmp_path):
    run_train(TrainConfig(model="tiny_mlp", epochs=6, **TINY), show_progress=False)
    space = tmp_path / "space.yaml"
    space.write_text(CODEBOOK_SPACE.replace("encoding: [codebook]", "encoding: [codebook, grid]"))
    cfg = SearchConfig(model="tiny_mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=2, pruner="none",
                       budget_ratio=0.1, space=str(space), deployable="int8", export=True, benchmark=False, **TINY)
    result = run_search(cfg, show_progress=False)
    assert all(not any(k.startswith("encoding.") for k in t["params"]) for t in result.trials)
    (winner,) = result.winners
    tags = MlflowClient().get_model_version("tiny_mlp-synthetic", winner["version"]).tags
    assert "codebook_layers" not in tags and winner["deploy_format"] == "onnx_int8_weights"
    onnx_tags = MlflowClient().get_model_version("tiny_mlp-synthetic", winner["onnx_version"]).tags
    assert onnx_tags["deploy_format"] == "onnx_int8_weights"  # exported with its parity check passed
    with pytest.raises(Exception, match="was run with deployable 'int8', this call has 'any'"):
        run_search(cfg.replace(deployable="any"), show_progress=False)


def test_the_pytorch_reference_of_a_model_leaves_its_codebook_layers_as_they_are():
    """The deploy check's PyTorch reference re-simulates grids from the recipe: codebook
    layers hold shared values on no grid, and re-quantizing them would change them."""
    from mcp.quantization.engine import simulated

    model = _pruned_mlp()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantizer = Quantizer(model, SHAPE, QuantSpec(method="qat", bits=3, codebook_layers=tuple(names)))
    quantizer.freeze()
    quantizer.finish()
    x = torch.randn(4, *SHAPE)
    again = simulated(model, SHAPE, quantizer.describe())
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))
    mixed = _pruned_mlp()
    quantizer = Quantizer(mixed, SHAPE, QuantSpec(method="qat", bits=3, codebook_layers=(names[0],)))
    quantizer.freeze()
    quantizer.finish()
    again = simulated(mixed, SHAPE, quantizer.describe())
    first, original = dict(again.named_modules())[names[0]], dict(mixed.named_modules())[names[0]]
    inputs = torch.randn(4, original.in_features)
    with torch.no_grad():  # the layer as it runs (any simulation hook applied): not re-quantized on a grid
        assert torch.equal(first(inputs), original(inputs))
