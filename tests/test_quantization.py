"""Quantization: bit packing and Huffman round trips, the payload codec, fake quantization
and QAT grids, k-means weight sharing, and the INT8 ONNX models in ONNX Runtime."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mcp.errors import ConfigError
from mcp.models import create_model
from mcp.quantization import Codebook, QuantSpec, Quantizer, Uniform, decode, decode_into, encode, encode_model
from mcp.quantization import huffman
from mcp.quantization.bits import pack, unpack
from mcp.quantization.codec import inference_state
from mcp.training import Trainer, build_optimizer

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits():
    from mcp.data import load_dataset, make_loaders

    splits = load_dataset("digits", "data", False, None, 0, 0.1)
    train, _, test = make_loaders(splits, 64, 0, 0)
    return splits, train, test


@pytest.fixture(scope="module")
def trained_cnn(digits):
    """tiny_cnn trained on digits for a few epochs (agreement tests need real margins)."""
    splits, train, test = digits
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10, splits.input_shape)
    opt = build_optimizer(model, "adamw", 0.01, 0.9, False, 0.0)
    Trainer(model, opt, None, train, test, epochs=6, device="cpu", seed=0, callbacks=[]).fit()
    return model.eval()


def _fit(model, loader, epochs=1, lr=0.01):
    opt = build_optimizer(model, "sgd", lr, 0.9, False, 5e-4)
    Trainer(model, opt, None, loader, loader, epochs=epochs, device="cpu", seed=0, callbacks=[],
            restore_best=False).fit()


def _prune_half(model):
    """Zero the smaller half of every conv/linear weight (a pruned model)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                w.mul_(w.abs() > w.abs().flatten().median())
    return model


# ----------------------------------------------------------------------------- bits and Huffman

@pytest.mark.parametrize("width", [1, 3, 5, 8, 13])
def test_fixed_width_packing_round_trips(width):
    values = np.random.default_rng(width).integers(0, 2 ** width, size=1001)
    data = b"xx" + pack(values, width)
    out, end = unpack(data, 2, values.size, width)
    assert np.array_equal(out, values) and end == len(data) == 2 + (1001 * width + 7) // 8


def test_huffman_round_trip_is_exact_and_beats_fixed_width_on_skewed_data():
    rng = np.random.default_rng(0)
    symbols = rng.choice(16, size=5000, p=np.r_[[0.5, 0.2, 0.1], np.full(13, 0.2 / 13)])
    data = huffman.encode(symbols)
    out, end = huffman.decode(b"" + data)
    assert np.array_equal(out, symbols) and end == len(data)
    assert len(data) < 5000 * 4 / 8  # fewer bytes than 4 bits per symbol
    lengths = huffman.code_lengths(symbols)
    assert sum(2.0 ** -n for n in lengths.values()) == pytest.approx(1.0)  # a complete prefix code
    assert lengths[0] == min(lengths.values())


@pytest.mark.parametrize("symbols", [[7] * 10, [0, 1], [], [3, 300000, 3, 3, 12]])
def test_huffman_edge_cases(symbols):
    out, _ = huffman.decode(huffman.encode(symbols))
    assert out.tolist() == list(symbols)


@pytest.mark.parametrize("seed", range(4))
def test_huffman_size_is_counted_exactly_without_writing(seed):
    rng = np.random.default_rng(seed)
    for n, top in [(0, 1), (1, 1), (50, 3), (3000, 40), (2000, 70000)]:
        symbols = np.minimum(rng.geometric(0.2, n) - 1, top - 1) * rng.integers(1, 3, n)
        exact = len(huffman.encode(symbols))
        assert huffman.encoded_size(symbols) == exact
        for below in (1, exact // 2, exact, exact + 1):  # a bound only where the size cannot be below it
            got = huffman.encoded_size(symbols, below)
            assert got == exact if exact < below else below <= got <= exact


def test_the_codec_keeps_the_smallest_layout_it_counted():
    """The encoder counts every layout before it writes one: the stream it writes is the
    smallest, whether dense, sparse, fixed or Huffman wins."""
    from mcp.quantization import codec

    rng = np.random.default_rng(3)
    for density in (0.02, 0.3, 0.95):
        mask = rng.random(5000) < density
        symbols, zero = Codebook(np.arange(1, 9, dtype=np.float32), rng.integers(0, 8, 5000), mask).symbols()
        chosen = codec._symbols_payload(symbols, zero, "huffman")
        every = [1 + codec._stream_size(symbols, huff) for huff in (False, True)]
        positions = np.flatnonzero(symbols != zero)
        for gaps, kept in codec._sparse_candidates(positions, symbols[positions], zero):
            every += [2 + codec._stream_size(gaps, huff) + codec._stream_size(kept, huff) for huff in (False, True)]
        assert len(chosen) == min(every)
        out, _ = codec._read_symbols(chosen, 0, symbols.size)
        assert np.array_equal(out, symbols)


# ----------------------------------------------------------------------------- payload codec

@pytest.mark.parametrize("coding", ["fixed", "huffman"])
def test_codec_round_trip_is_bit_exact(coding):
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((4, 3)).astype(np.float32)
    sparse_raw = raw * (rng.random((4, 3)) > 0.8)
    mask = rng.random((6, 5, 3, 3)) > 0.7
    book = Codebook(np.array([-0.5, -0.1, 0.2, 0.7], dtype=np.float32), rng.integers(0, 4, (6, 5, 3, 3)), mask)
    uni = Uniform(rng.integers(-7, 8, (6, 10)), rng.random(6).astype(np.float32) + 0.01, np.zeros(6, dtype=int),
                  4, True, 0)
    asym = Uniform(rng.integers(0, 32, (3, 4)), np.array([0.1], dtype=np.float32), np.array([9]), 5, False, -1)
    data = encode([raw, sparse_raw, book, uni, asym], coding)
    out = decode(data)
    for got, want in zip(out, [raw, sparse_raw, book.values(), uni.values(), asym.values()]):
        assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.count_nonzero(out[2]) == mask.sum()
    with pytest.raises(ValueError, match="bad magic"):
        decode(b"NOPE" + data[4:])


def test_sparse_layers_encode_smaller_and_huffman_smaller_still():
    rng = np.random.default_rng(2)
    mask = rng.random((100, 64)) > 0.9
    labels = rng.choice(16, size=(100, 64), p=np.r_[[0.4, 0.3], np.full(14, 0.3 / 14)])
    book = Codebook(np.linspace(-1, 1, 16).astype(np.float32), labels, mask)
    fixed, huff = len(encode([book], "fixed")), len(encode([book], "huffman"))
    dense_bits = 6400 * 5 / 8  # 16 centroids + the zero symbol, dense
    assert fixed < dense_bits / 2 and huff < fixed


def test_encode_model_round_trip_into_a_fresh_model():
    torch.manual_seed(0)
    model = _prune_half(create_model("tiny_cnn", 10, SHAPE))
    data = encode_model(model, {}, "huffman")
    fresh = create_model("tiny_cnn", 10, SHAPE)
    decode_into(fresh, data)
    for (k, a), b in zip(inference_state(model).items(), inference_state(fresh).values()):
        assert torch.equal(a, b), k
    assert len(data) < 4 * sum(v.numel() for v in inference_state(model).values())
    with pytest.raises(ValueError, match="tensors"):
        decode_into(create_model("tiny_mlp", 10, SHAPE), data)


# ----------------------------------------------------------------------------- uniform / QAT

@pytest.mark.parametrize("symmetric,per_channel", [(True, True), (False, True), (True, False), (False, False)])
def test_qat_4_bit_trains_and_weights_take_at_most_16_values(digits, symmetric, per_channel):
    splits, train, _ = digits
    torch.manual_seed(0)
    model = _prune_half(create_model("tiny_cnn", 10, splits.input_shape))
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    q = Quantizer(model, splits.input_shape, QuantSpec("qat", bits=4, act_bits=8, symmetric=symmetric,
                                                       per_channel=per_channel))
    before = copy.deepcopy(model.features[0].parametrizations.weight.original)
    _fit(model, train)
    assert not torch.equal(before, model.features[0].parametrizations.weight.original)  # it trained
    q.freeze()
    with torch.no_grad():
        sim_out = model(next(iter(train))[0])
    entries = q.finish()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
            assert max(torch.unique(r).numel() for r in rows) <= 16
            assert torch.equal(w == 0, zeros[name]) or bool((w[zeros[name]] == 0).all())
            assert torch.equal(torch.from_numpy(entries[f"{name}.weight"].values()), w)  # the payload is exact
    # the baked model equals the simulated one when activations are not quantized
    assert sim_out.shape == (64, 10)


def test_fixed_point_without_act_quant_bakes_exactly_what_it_simulated():
    torch.manual_seed(0)
    model = create_model("tiny_resnet", 10, (3, 8, 8)).eval()
    x = torch.randn(8, 3, 8, 8)
    q = Quantizer(model, (3, 8, 8), QuantSpec("fixed_point", bits=3, layer_bits={"fc": 6}))
    with torch.no_grad():
        simulated = model(x)
    entries = q.finish()
    assert not any("parametrizations" in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), simulated)
    assert entries["fc.weight"].bits == 6 and {e.bits for k, e in entries.items() if k != "fc.weight"} == {3}
    for m in model.modules():  # 3-bit symmetric grid per channel: -3..3
        if isinstance(m, nn.Conv2d):
            assert max(torch.unique(c).numel() for c in m.weight.detach()) <= 7


@pytest.mark.parametrize("spec,match", [
    (QuantSpec("fixed_point", bits=9), "bit-widths 2-8"),
    (QuantSpec("fixed_point", bits=1), "bit-widths 2-8"),
    (QuantSpec("fixed_point", layer_bits={"nope": 4}), "unknown layer"),
    (QuantSpec("ptq_int8", bits=4), "8-bit"),
    (QuantSpec("qat", observer="median"), "unknown observer"),
    (QuantSpec("kmeans", kmeans_init="kpp"), "unknown kmeans_init"),
    (QuantSpec("sparsify"), "unknown quantization method"),
])
def test_invalid_specs_fail_clearly(spec, match):
    with pytest.raises(ConfigError, match=match):
        Quantizer(create_model("tiny_cnn", 10, SHAPE), SHAPE, spec)


# ----------------------------------------------------------------------------- k-means

@pytest.mark.parametrize("init", ["forgy", "density", "linear"])
def test_kmeans_leaves_exactly_2_to_the_b_values_and_keeps_zeros(digits, init):
    splits, train, _ = digits
    torch.manual_seed(0)
    model = _prune_half(create_model("tiny_mlp", 10, splits.input_shape))
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    q = Quantizer(model, splits.input_shape, QuantSpec("kmeans", bits=3, layer_bits={"5": 2}, kmeans_init=init))
    centroids_before = model[1].weight_centroids.detach().clone()
    _fit(model, train)  # the centroids are fine-tuned by gradient
    assert not torch.equal(centroids_before, model[1].weight_centroids.detach())
    entries = q.finish()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
            assert torch.equal(w == 0, zeros[name])
            k = 4 if name == "5" else 8
            assert torch.unique(w[w != 0]).numel() == k
            assert torch.equal(torch.from_numpy(entries[f"{name}.weight"].values()), w)


@pytest.mark.parametrize("k", [4, 16, 32])
def test_one_dimensional_lloyd_matches_scikit_learn(k):
    """k-means of a pruned layer's weights (a gap around zero, heavy tails: empty
    clusters happen from a linear start) ends where scikit-learn's Lloyd ends."""
    from sklearn.cluster import KMeans

    from mcp.quantization.kmeans import lloyd_1d

    rng = np.random.default_rng(k)
    w = rng.standard_t(3, 20000) * 0.05
    values = w[np.abs(w) > np.quantile(np.abs(w), 0.9)]
    init = np.linspace(values.min(), values.max(), k)
    centroids, labels = lloyd_1d(values, init)
    ref = KMeans(n_clusters=k, init=init.reshape(-1, 1), n_init=1, max_iter=100).fit(values.reshape(-1, 1))
    assert np.allclose(centroids, np.sort(ref.cluster_centers_.ravel()), rtol=1e-5, atol=1e-7)
    assert float(((values - centroids[labels]) ** 2).sum()) == pytest.approx(ref.inertia_, rel=1e-6)
    assert np.array_equal(labels, np.abs(values[:, None] - centroids[None, :]).argmin(1))


def test_kmeans_on_a_layer_with_few_values_keeps_them():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.0, 0.5, -0.25]).repeat(86)[:256].view(4, 64))
    q = Quantizer(model, SHAPE, QuantSpec("kmeans", bits=2))
    before = model[1].weight.detach().clone()
    q.finish()
    assert torch.equal(model[1].weight, before)


# ----------------------------------------------------------------------------- ONNX Runtime

def test_ptq_int8_onnx_agrees_with_the_fake_quant_model(trained_cnn, digits, tmp_path):
    from mcp.deploy import export_onnx, ort_predict, ort_session
    from mcp.quantization.onnx_int8 import static_int8

    splits, train, test = digits
    calib = [b for _, b in zip(range(8), train)]
    fp32 = export_onnx(trained_cnn, splits.input_shape, tmp_path / "fp32.onnx")
    int8 = static_int8(fp32, tmp_path / "int8.onnx", calib, "minmax")
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    sim = copy.deepcopy(trained_cnn)
    q = Quantizer(sim, splits.input_shape, QuantSpec("ptq_int8"))
    q.calibrate(calib, "cpu")
    x, _ = next(iter(test))
    with torch.no_grad():
        torch_pred = sim(x).argmax(1).numpy()
    ort_pred = ort_predict(ort_session(int8), x).argmax(1)
    assert np.mean(torch_pred == ort_pred) >= 0.99
    weights = [i for i in onnx.load(str(int8)).graph.initializer if len(i.dims) in (2, 4)]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)


@pytest.mark.parametrize("observer", ["percentile", "entropy"])
def test_ptq_int8_observers_calibrate_in_both_worlds(trained_cnn, digits, tmp_path, observer):
    from mcp.deploy import export_onnx, ort_evaluate, ort_session
    from mcp.quantization.onnx_int8 import static_int8

    splits, train, test = digits
    calib = [b for _, b in zip(range(4), train)]
    int8 = static_int8(export_onnx(trained_cnn, splits.input_shape, tmp_path / "fp32.onnx"), tmp_path / "q.onnx",
                       calib, observer)
    sim = copy.deepcopy(trained_cnn)
    q = Quantizer(sim, splits.input_shape, QuantSpec("ptq_int8", observer=observer))
    q.calibrate(calib, "cpu")
    reference = Quantizer(copy.deepcopy(trained_cnn), splits.input_shape, QuantSpec("ptq_int8"))
    reference.calibrate(calib, "cpu")
    # a clipping observer never widens the min/max range, and narrows some
    pairs = [(q.sim.act[n].hi.item(), reference.sim.act[n].hi.item()) for n in q.sim.act]
    assert all(h <= m for h, m in pairs) and any(h < m for h, m in pairs)
    from mcp.training import evaluate

    ort_acc = ort_evaluate(ort_session(int8), test)["accuracy"]
    assert abs(ort_acc - evaluate(sim, test, "cpu")["accuracy"]) < 0.03
    assert ort_acc > 0.8


def test_dynamic_int8_quantizes_the_fully_connected_layers(digits, tmp_path):
    from mcp.deploy import export_onnx, ort_predict, ort_session
    from mcp.quantization.onnx_int8 import dynamic_int8

    splits, train, test = digits
    torch.manual_seed(0)
    model = create_model("lenet300_100", 10, splits.input_shape)
    _fit(model, train, epochs=3, lr=0.05)
    model.eval()
    fp32 = export_onnx(model, splits.input_shape, tmp_path / "fp32.onnx")
    int8 = dynamic_int8(fp32, tmp_path / "dyn.onnx")
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size
    x, _ = next(iter(test))
    sim = copy.deepcopy(model)
    Quantizer(sim, splits.input_shape, QuantSpec("dynamic_int8"))
    with torch.no_grad():
        torch_pred = sim(x).argmax(1).numpy()
    assert np.mean(ort_predict(ort_session(int8), x).argmax(1) == torch_pred) >= 0.99


def test_low_bit_weights_deploy_exactly_as_int8_dequantize_linear(tmp_path):
    import onnx

    from mcp.deploy import export_onnx, ort_predict, ort_session
    from mcp.quantization.onnx_int8 import weight_int8_dq

    torch.manual_seed(0)
    model = create_model("tiny_resnet", 10, (3, 8, 8))
    for m in model.modules():  # BN that the export folds into the convs
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, -1.0, 1.0), nn.init.uniform_(m.running_var, 0.5, 2.0)
    model.eval()
    q = Quantizer(model, (3, 8, 8), QuantSpec("fixed_point", bits=4))
    entries = q.finish()
    fp32 = export_onnx(model, (3, 8, 8), tmp_path / "fp32.onnx")
    out = weight_int8_dq(fp32, tmp_path / "w4.onnx", q.signed_integers(entries))
    graph = onnx.load(str(out)).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == len(q.order)
    assert all(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer if i.name.endswith("_int8"))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.allclose(ort_predict(ort_session(out), x), want, atol=1e-4)
    # weights that are not on the grid are refused
    with pytest.raises(ValueError, match="not on the quantization grid"):
        weight_int8_dq(fp32, tmp_path / "bad.onnx", [np.ones_like(i) if i is not None else None
                                                      for i in q.signed_integers(entries)])


def test_long_gaps_are_bridged_by_fillers_and_round_trip():
    from mcp.quantization.codec import _with_fillers

    positions = np.array([0, 3, 40, 41, 300])
    gaps, values = _with_fillers(positions, np.array([1, 2, 3, 4, 5]), cap_bits=3, filler=0)
    assert gaps.max() <= 7 and np.array_equal(np.cumsum(gaps + 1)[values != 0] - 1, positions)
    assert values.size > positions.size and set(values[values == 0]) == {0}
    labels = np.zeros(400, dtype=np.int64)
    mask = np.zeros(400, dtype=bool)
    mask[positions] = True
    labels[positions] = [1, 2, 3, 0, 1]
    book = Codebook(np.array([-1.0, 0.5, 2.0, 3.0], dtype=np.float32), labels, mask)
    for coding in ("fixed", "huffman"):
        assert np.array_equal(decode(encode([book, book.values() * 3], coding))[0], book.values())
