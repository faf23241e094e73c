"""The models users bring today, pruned structurally as far as asked: vision transformers
(the embedding width through ``pos_embed`` and ``cls_token``, the MLP width, each head's
width with the head count kept, or whole heads), Swin (its patch merging pruned as one
unit), ConvNeXt (layer scale, LayerNorm), MobileNetV3 and EfficientNet
(squeeze-excitation), RegNet. Tiny configurations of timm's architectures, untrained: each
is pruned, reloaded from its recipe with identical outputs, exported with parity, and
searched for a trial."""

from __future__ import annotations

import pytest
import torch

import mcp
from mcp.data import load_dataset, make_loaders
from mcp.errors import McpError
from mcp.models import model_from_recipe
from mcp.models.foreign import TIMM_FACTORY, build_from_factory

timm = pytest.importorskip("timm")

SHAPE = (3, 32, 32)
FAMILIES = {
    "vit": {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48,
            "num_heads": 3},
    "deit": {"model_name": "deit_tiny_distilled_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2,
             "embed_dim": 48, "num_heads": 3},
    "convnext": {"model_name": "convnext_atto", "depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)},
    "mobilenetv3": {"model_name": "mobilenetv3_small_050"},
    "efficientnet": {"model_name": "test_efficientnet"},  # timm's own tiny EfficientNet (squeeze-excitation)
    "regnet": {"model_name": "regnetx_002"},
    "swin": {"model_name": "swin_tiny_patch4_window7_224", "img_size": 32, "patch_size": 2, "window_size": 4,
             "depths": (1, 1, 2), "num_heads": (2, 4, 8), "embed_dim": 24},  # patch merging: mcp.pruning.custom
}


@pytest.fixture(scope="module")
def data():
    return make_loaders(load_dataset("synthetic", input_shape="3x32x32", num_classes=10), 32)


def _timm(kwargs: dict) -> torch.nn.Module:
    kwargs = {**kwargs, "pretrained": False, "num_classes": 10}
    torch.manual_seed(0)
    model = build_from_factory(TIMM_FACTORY, kwargs).eval()
    model.mcp_recipe = {"name": kwargs["model_name"], "factory": TIMM_FACTORY, "kwargs": kwargs, "num_classes": 10,
                        "input_shape": list(SHAPE)}
    return model


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_is_pruned_as_far_as_asked_and_reloads_and_exports(family, data, tmp_path):
    model = _timm(FAMILIES[family])
    out = mcp.prune(model, data, sparsity=0.5, granularity="structured", epochs=1, track=False, device="cpu")
    # half the channels of every layer in scope: about three quarters of the parameters (a CNN's figure), not a
    # quarter as when the embedding width and layer scales stayed whole
    removed = 1 - _params(out.model) / _params(model)
    assert removed > 0.6, removed
    assert out.metrics["pruned_fraction"] == pytest.approx(removed, abs=0.01)
    again = model_from_recipe(dict(out.model.mcp_recipe))  # as a fresh process rebuilds it
    again.load_state_dict(out.model.state_dict())
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), out.model.eval()(x), atol=1e-5)
    deployed = mcp.export(out.model, data, tmp_path / "model.onnx")
    assert deployed.metrics["onnx_agreement"] >= 0.99


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_search_trial_runs_on_every_family(family, data, tmp_path):
    model = _timm(FAMILIES[family])
    space = tmp_path / "space.yaml"  # one trial, no fine-tuning: the search's prune, quantize and size steps
    space.write_text("prune: {granularity: [structured], ratio: [0.4, 0.4]}\nquantize: {bits: [8]}\n"
                     "finetune: {epochs: [0, 0]}\n")
    found = mcp.search(model, data, space=space, budget_bytes=4 * _params(model), trials=1, device="cpu")
    assert found.trials[0]["state"] == "complete" and found.winner is not None
    assert _params(found.model) < 0.75 * _params(model)
    assert found.model(torch.zeros(2, *SHAPE)).shape == (2, 10)


def test_attention_heads_keep_their_count_and_lose_width(data):
    model = _timm(FAMILIES["vit"])
    out = mcp.prune(model, data, sparsity=0.5, granularity="structured", epochs=1, track=False, device="cpu")
    for block in out.model.blocks:
        attn = block.attn
        assert attn.num_heads == 3 and attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
        assert attn.head_dim < 16 and attn.proj.in_features == attn.num_heads * attn.head_dim
    assert out.model.pos_embed.shape[-1] == out.model.cls_token.shape[-1] == out.model.patch_embed.proj.out_channels
    assert out.model.pos_embed.shape[-1] < 48  # the embedding width itself
    recipe = out.model.mcp_recipe
    assert recipe["pruning_unwrapped"] == {"cls_token": 2, "pos_embed": 2}
    assert set(recipe["attention_heads"]) == {"blocks.0.attn", "blocks.1.attn"}


class PatchMerger(torch.nn.Module):
    """Merges 2x2 patches by reshaping channels into a 4x wider vector, as Swin does, in a
    class of its own (mcp's custom pruner knows timm's, not this one)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(32)
        self.reduction = torch.nn.Linear(32, 16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.fc(self.reduction(self.norm(x)).mean((1, 2)))


def test_an_architecture_whose_channels_the_graph_cannot_follow_is_one_line(data):
    """Channels reshaped into a wider vector: pruning breaks the forward pass, which is said
    in one line instead of failing later in training."""
    with pytest.raises(McpError) as info:
        mcp.prune(PatchMerger(), data, sparsity=0.5, granularity="structured", epochs=1, track=False, device="cpu")
    message = str(info.value)
    assert "breaks this PatchMerger's forward pass" in message and "granularity unstructured" in message
    assert "\n" not in message


def test_a_transformer_deploys_its_linear_layers_as_int8(data, tmp_path):
    """A transformer's Linear layers export as MatMul by their transposed weight: QAT's grid
    stores them as INT8 behind DequantizeLinear (axis 1), static INT8 quantizes them (QDQ)."""
    import onnx

    model = _timm(FAMILIES["vit"])
    qat = mcp.quantize(model, data, method="qat", bits=6, epochs=1, track=False, device="cpu", out_dir=tmp_path / "q")
    assert qat.deploy_format == "onnx_int8_weights" and qat.metrics["onnx_agreement"] >= 0.99
    graph = onnx.load(str(qat.onnx_path)).graph
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantized) == 10  # the patch embedding, qkv, proj, fc1, fc2 of each of 2 blocks, the head
    int8 = {i.name: list(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert [48, 144] in int8.values()  # qkv: [in, out], as MatMul multiplies by it
    ptq = mcp.quantize(model, data, method="ptq_int8", track=False, device="cpu", out_dir=tmp_path / "p")
    assert ptq.deploy_format == "onnx_qdq_int8" and ptq.metrics["onnx_agreement"] >= 0.9
    graph = onnx.load(str(ptq.onnx_path)).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    fed = {n.op_type for n in graph.node if any(made_by.get(i) == "DequantizeLinear" for i in n.input)}
    # the operators with a weight run INT8 (patch embedding, qkv, proj, fc1, fc2, head), with float outputs; the
    # attention's own products, LayerNorm, Softmax, GELU and the additions stay float
    assert fed == {"Conv", "MatMul", "Gemm"}, fed
    weights = {i.name for i in graph.initializer}
    int8_products = [n for n in graph.node if n.op_type == "MatMul" and made_by.get(n.input[0]) == "DequantizeLinear"]
    assert len(int8_products) == 8  # qkv, proj, fc1, fc2 of 2 blocks: not q @ k^T nor scores @ v
    assert all(made_by.get(n.input[1]) == "DequantizeLinear" for n in int8_products) and weights


@pytest.mark.slow  # the MatMul mapping it relies on is the fast test above
def test_a_search_under_an_onnx_budget_removes_a_transformer_s_channels(data):
    model = _timm(FAMILIES["vit"])
    budget = 0.15 * 4 * _params(model)  # an INT8 file of 60% of the parameters: channels must go
    found = mcp.search(model, data, space="structured", budget_bytes=budget, budget_on="onnx", trials=2, device="cpu")
    assert any(t["state"] == "complete" for t in found.trials) and found.winner is not None
    row = next(t for t in found.trials if t["number"] == found.winner.number)
    assert _params(found.model) < 0.7 * _params(model) and row["size_bytes_onnx"] <= budget


def test_precision_speed_times_a_transformer_s_matmul_layers_per_shape(tmp_path, monkeypatch):
    """`--precision speed` decides per layer: every Linear of a transformer (a MatMul of a
    3-D input whose shape only a run of the model shows) is timed at its own shape."""
    from mcp.deploy import kernel_speed
    from mcp.deploy.onnx import export_onnx

    model = _timm(FAMILIES["vit"])
    path = export_onnx(model, SHAPE, tmp_path / "vit.onnx")
    timed = []
    monkeypatch.setattr(kernel_speed, "time_pair", lambda layer, threads=1, runtime="onnxruntime":
                        timed.append(layer) or (1.0, 0.5))
    speeds = kernel_speed.layer_speeds(path, cache=tmp_path / "cache.json")
    linear = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(speeds) == len(linear) == 10
    matmuls = [layer for layer in timed if layer["op"] == "MatMul"]
    assert len(matmuls) == 4  # qkv, proj, fc1, fc2: the two blocks share their shapes, each shape timed once
    assert {tuple(layer["x"]) for layer in matmuls} == {(1, 17, 48), (1, 17, 192)}  # 16 patches and the class token


def test_whole_transformer_blocks_are_removed_with_their_channels(data):
    """`--drop-blocks` on a transformer: the blocks of its list whose removal raises the loss
    least go, the rest lose channels, and the recipe replays both."""
    from mcp.pruning.depth import removable_blocks

    model = _timm({**FAMILIES["vit"], "depth": 4})
    assert removable_blocks(model, SHAPE) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    out = mcp.prune(model, data, sparsity=0.5, granularity="structured", drop_blocks=2, epochs=1, track=False,
                    device="cpu")
    assert len(out.dropped) == 2 and sum(isinstance(b, torch.nn.Identity) for b in out.model.blocks) == 2
    again = model_from_recipe(dict(out.model.mcp_recipe))
    again.load_state_dict(out.model.state_dict())
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), out.model.eval()(x), atol=1e-5)


def test_whole_heads_are_removed_in_each_attention_module_over_a_schedule(data, tmp_path):
    model = _timm(FAMILIES["vit"])  # 3 heads of 16 per block
    out = mcp.prune(model, data, sparsity=0.25, granularity="structured", scope="layerwise", head_ratio=0.3,
                    schedule="gradual", steps=2, prune_epochs=1, epochs=2, track=False, device="cpu")
    for block in out.model.blocks:  # ceil(0.3 x 3) = 1 head gone, each left head whole
        attn = block.attn
        assert (attn.num_heads, attn.head_dim) == (2, 16)
        assert attn.qkv.out_features == 3 * 2 * 16 and attn.proj.in_features == 2 * 16
    assert out.model.mcp_recipe["attention_heads"] == {"blocks.0.attn": 2, "blocks.1.attn": 2}
    assert out.metrics["heads_pruned_fraction"] == pytest.approx(1 / 3)
    assert out.model.pos_embed.shape[-1] < 48  # the channel ratio still prunes the embedding width
    again = model_from_recipe(dict(out.model.mcp_recipe))
    again.load_state_dict(out.model.state_dict())
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), out.model.eval()(x), atol=1e-5)
    assert mcp.export(out.model, data, tmp_path / "heads.onnx").metrics["onnx_agreement"] >= 0.99


def test_the_removed_heads_are_the_least_important_ones():
    from mcp.pruning import PruneSpec
    from mcp.pruning.engine import prune

    model = _timm({**FAMILIES["vit"], "depth": 1})
    attn, width, dead = model.blocks[0].attn, 48, 1
    with torch.no_grad():  # head 1 contributes nothing and weighs least: removing it changes no output
        for part in range(3):
            attn.qkv.weight[part * width + 16 * dead: part * width + 16 * (dead + 1)] *= 1e-3
        attn.proj.weight[:, 16 * dead: 16 * (dead + 1)] = 0
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        before = model(x)
    prune(model, PruneSpec(granularity="structured", scope="layerwise", sparsity=0.0, head_ratio=0.3), SHAPE)
    assert attn.num_heads == 2
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)


def test_a_head_ratio_that_leaves_no_head_or_has_no_heads_is_one_line():
    from mcp.errors import ConfigError
    from mcp.pruning import PruneSpec
    from mcp.pruning.engine import Pruning

    def refused(kwargs: dict, family: str = "vit") -> str:
        with pytest.raises(ConfigError) as err:
            Pruning(_timm(FAMILIES[family]), SHAPE, PruneSpec(granularity="structured", sparsity=0.2, **kwargs), [])
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "leaves blocks.0.attn (3 heads) no head" in refused({"scope": "layerwise", "head_ratio": 0.7})
    assert "at most 0.6667" in refused({"scope": "layerwise", "head_ratio": 0.7})
    assert "scope 'layerwise'" in refused({"head_ratio": 0.3})  # global: heads are ranked per module
    assert "no attention module" in refused({"scope": "layerwise", "head_ratio": 0.3}, "convnext")
    assert "'blocks.0.mlp': not an attention module" in refused({"scope": "layerwise",
                                                                  "head_ratios": {"blocks.0.mlp": 0.3}})


def test_a_head_ratio_is_refused_before_any_run_starts(own_store, cli, tmp_path):
    from mlflow import MlflowClient

    kwargs = "{num_classes: 10, in_chans: 1, img_size: 8, patch_size: 4, depth: 1, embed_dim: 16, num_heads: 2}"
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1, img_size=8,
                            patch_size=4, depth=1, embed_dim=16, num_heads=2)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    imported = cli("import", "--timm", "vit_tiny_patch16_224", "--module-kwargs", kwargs,
                   "--weights", str(tmp_path / "vit.pth"))
    assert imported.exit_code == 0, imported.output
    runs = lambda: len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]))
    before = runs()
    base = ["prune", "--model-uri", "models:/vit_tiny_patch16_224-digits@baseline", "--granularity", "structured",
            "--epochs", "1"]
    for extra, said in ((["--scope", "layerwise", "--head-ratio", "0.6"], "leaves blocks.0.attn (2 heads) no head"),
                        (["--head-ratio", "0.4"], "needs granularity structured and scope layerwise")):
        result = cli(*base, *extra)
        assert result.exit_code == 2, result.output
        assert said in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert runs() == before
    done = cli(*base, "--scope", "layerwise", "--head-ratio", "0.5", "--sparsity", "0.25")
    assert done.exit_code == 0, done.output
    assert "heads removed 50.0%" in done.output  # 1 of 2 heads, said beside the channels and parameters
    assert runs() == before + 1


def test_a_search_samples_the_heads_of_each_block(data, tmp_path):
    model = _timm(FAMILIES["vit"])  # 3 heads a block: heads [0.3, 0.7] removes 1 or 2 of them
    space = tmp_path / "space.yaml"
    space.write_text("prune: {granularity: [structured], ratio: [0.0, 0.3], heads: [0.3, 0.7]}\n"
                     "quantize: {bits: [8]}\nfinetune: {epochs: [1, 1]}\n")
    found = mcp.search(model, data, space=space, budget_bytes=4 * _params(model), trials=3, device="cpu")
    sampled = [row["params"] for row in found.trials]
    assert all({k for k in p if k.startswith("heads.")} == {"heads.blocks.0.attn", "heads.blocks.1.attn"}
               for p in sampled[1:])  # the first trial is the uniform start: the fewest heads removed, 1
    assert all(p.get(f"heads.blocks.{i}.attn", 1) in (1, 2) for p in sampled for i in range(2))
    chosen = found.winner.config.heads  # the winner's shares: its blocks keep 3 - 3 x share heads
    assert [b.attn.num_heads for b in found.model.blocks] == [3 - round(3 * chosen[f"blocks.{i}.attn"])
                                                             for i in range(2)]
    assert all(b.attn.num_heads in (1, 2) for b in found.model.blocks)


def test_a_space_s_heads_need_attention_modules_and_structured_pruning(data, tmp_path):
    from mcp.errors import ConfigError

    space = tmp_path / "space.yaml"
    space.write_text("prune: {granularity: [structured], heads: [0.0, 0.5]}\nquantize: {bits: [8]}\n")
    with pytest.raises(ConfigError, match="no attention module"):
        mcp.search(_timm(FAMILIES["convnext"]), data, space=space, budget_bytes=1e9, trials=1, device="cpu")
    space.write_text("prune: {granularity: [structured, unstructured], heads: [0.0, 0.5]}\nquantize: {bits: [8]}\n")
    with pytest.raises(ConfigError, match="needs granularity"):
        mcp.search(_timm(FAMILIES["vit"]), data, space=space, budget_bytes=1e9, trials=1, device="cpu")


def test_whole_heads_of_a_swin_window_are_refused_in_one_line():
    """A Swin window's relative position bias holds one entry per head, which the graph
    does not prune with the heads: whole heads are refused there, head width is not."""
    from mcp.errors import ConfigError
    from mcp.pruning import PruneSpec
    from mcp.pruning.engine import Pruning

    with pytest.raises(ConfigError, match="relative_position_bias_table holds one entry per head"):
        Pruning(_timm(FAMILIES["swin"]), SHAPE, PruneSpec(granularity="structured", scope="layerwise", sparsity=0.3,
                                                           head_ratio=0.5), [])


def test_the_transformer_space_samples_heads_mlp_widths_and_blocks_per_block():
    from mcp.pruning.pruner import attention_modules, layers_in_order
    from mcp.tuner.space import build_space, read_space_file, space_file_for

    path = space_file_for("vit_tiny_patch16_224")  # an imported timm ViT gets it by its name
    assert path.name == "transformer.yaml"
    model = _timm({**FAMILIES["vit"], "depth": 3})
    layers = [n for n, _ in layers_in_order(model, SHAPE)]
    space = build_space(read_space_file(path), layers, path.name,
                        {n: m.num_heads for n, m in attention_modules(model).items()})
    assert set(space.units["embedding"]) == {"patch_embed.proj"} | {f"blocks.{i}.{n}" for i in range(3)
                                                                     for n in ("attn.proj", "mlp.fc2")}
    assert {f"blocks.{i}.{n}" for i in range(3) for n in ("attn.qkv", "mlp.fc1")} <= set(space.units)
    assert space.attention == {f"blocks.{i}.attn": 3 for i in range(3)} and space.drop_blocks == (0, 2)
