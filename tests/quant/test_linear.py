"""quant.Linear4bit: forward/backward against the dequantized reference, the bitsandbytes state
dict (keys, dtypes, JSON, round trips, meta + assign), devices and dtypes, bad state dicts."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from quant.dynamic import dynamic_map


def make_layer(out_features=48, in_features=40, bias=True, dtype=torch.float32, **kw):
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return linear, quant.Linear4bit.from_linear(linear, **kw)


# --- forward and backward ---

@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_x_times_dequantized_weight(bias):
    linear, layer = make_layer(bias=bias)
    x = torch.randn(2, 5, 40)
    w = quant.dequantize_4bit(layer.weight, layer.quant_state)
    torch.testing.assert_close(layer(x), F.linear(x, w, linear.bias), rtol=1e-6, atol=1e-6)
    assert layer.dequantize().shape == (48, 40)
    assert torch.equal(layer.dequantize(), w)
    # and the quantized layer approximates the original one
    rel = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert 0.01 < rel < 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant,blocksize,shape", [(True, 64, (48, 40)), (False, 128, (33, 77)),
                                                          (True, 32, (300, 96))])
def test_cpu_merged_weight_is_bit_for_bit_the_kernels_reference(dtype, double_quant, blocksize, shape):
    """dequantize and dequantize_lowrank take quant's own decoding on the CPU; it must equal the
    plain formula of kernels/reference.py, which the GPU kernels are checked against."""
    from kernels import reference
    layer = quant.Linear4bit.from_weight(torch.randn(*shape), blocksize=blocksize, double_quant=double_quant)
    lora_b, lora_a = torch.randn(shape[0], 8), torch.randn(8, shape[1])
    assert torch.equal(layer.dequantize(dtype), reference.dequantize_nf4(layer.weight, layer.quant_state, dtype))
    assert torch.equal(layer.dequantize_lowrank(lora_b, lora_a, 0.25, dtype),
                       reference.dequantize_nf4_lowrank(layer.weight, layer.quant_state, lora_b, lora_a, 0.25, dtype))


def test_backward_gives_input_and_bias_grads_only():
    linear, layer = make_layer()
    w = layer.dequantize().clone()
    x = torch.randn(7, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = linear.bias.detach().clone().requires_grad_(True)
    grad_out = torch.randn(7, 48)
    layer(x).backward(grad_out)
    F.linear(x_ref, w, bias_ref).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, bias_ref.grad, rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_autograd_saves_no_dense_weight():
    _, layer = make_layer(out_features=64, in_features=64)
    saved = []
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert all(t.numel() < 64 * 64 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compute_dtype(compute_dtype):
    _, layer = make_layer(compute_dtype=compute_dtype)
    x = torch.randn(4, 40, requires_grad=True)
    y = layer(x)
    assert y.dtype == compute_dtype
    w = quant.dequantize_4bit(layer.weight, layer.quant_state, dtype=compute_dtype)
    torch.testing.assert_close(y, x.to(compute_dtype) @ w.t() + layer.bias.to(compute_dtype))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_constructor_initialises_like_nn_linear():
    layer = quant.Linear4bit(256, 128, compute_dtype=torch.float32)
    w = layer.dequantize()
    bound = 1 / 256 ** 0.5  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(in), 1/sqrt(in))
    assert w.abs().max() <= bound * 1.0001 and w.std() > bound / 3
    assert layer.bias.abs().max() <= bound and layer.weight.dtype == torch.uint8
    assert "quant_type=nf4" in repr(layer) and "blocksize=64" in repr(layer)


def test_from_linear_shares_the_bias_and_keeps_no_dense_copy():
    linear, layer = make_layer(dtype=torch.bfloat16)
    assert layer.bias is linear.bias
    assert layer.compute_dtype == torch.bfloat16 and layer.quant_state.dtype == torch.bfloat16
    tensors = list(layer.parameters()) + list(layer.buffers())
    assert all(not (t.is_floating_point() and t.numel() >= 48 * 40) for t in tensors)


def test_bad_inputs_to_the_layer():
    _, layer = make_layer()
    with pytest.raises(ValueError, match=r"\(3, 41\).*in_features=40"):
        layer(torch.randn(3, 41))
    with pytest.raises(ValueError, match="power of two"):
        quant.Linear4bit(8, 8, blocksize=100)
    with pytest.raises(ValueError, match="in_features"):
        quant.Linear4bit(0, 8)
    with pytest.raises(ValueError, match=r"\(out, in\)"):
        quant.Linear4bit.from_weight(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="int32"):
        quant.Linear4bit.from_weight(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.Linear4bit.from_weight(torch.full((4, 4), float("nan")))


# --- devices and dtypes ---

def test_casting_the_model_keeps_statistics_in_float32():
    _, layer = make_layer()
    before = {k: v.clone() for k, v in layer.named_buffers()}
    out = layer(torch.randn(2, 40)).float()
    model = nn.Sequential(layer).to(torch.bfloat16)
    for name, tensor in layer.named_buffers():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert layer.bias.dtype == torch.bfloat16 and layer.weight.dtype == torch.uint8
    model.half()
    assert layer.absmax.dtype == torch.uint8 and layer.offset.dtype == torch.float32
    torch.testing.assert_close(layer(torch.randn(2, 40)).shape, out.shape)


@pytest.mark.gpu
def test_cuda_moves_everything_and_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    linear, layer = make_layer(out_features=256, in_features=320)
    x = torch.randn(3, 320)
    y_cpu = layer(x)
    layer.cuda()
    assert all(t.is_cuda for t in list(layer.parameters()) + list(layer.buffers()))
    torch.testing.assert_close(layer(x.cuda()).cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    # quantizing on the GPU gives the same codes and statistics (the mean offset may differ in
    # its last bit: CPU and CUDA sum in different orders)
    cpu_plain = quant.Linear4bit.from_linear(linear, double_quant=False)
    gpu_plain = quant.Linear4bit.from_linear(linear.cuda(), double_quant=False)
    assert torch.equal(gpu_plain.row_codes().cpu(), cpu_plain.weight)  # Note [tiled codes on the GPU]
    assert torch.equal(gpu_plain.absmax.cpu(), cpu_plain.absmax)
    on_gpu = quant.Linear4bit.from_linear(linear)
    assert torch.equal(on_gpu.row_codes().cpu(), layer.row_codes().cpu())
    torch.testing.assert_close(on_gpu.offset.cpu(), layer.offset.cpu(), rtol=1e-6, atol=0)
    torch.testing.assert_close(on_gpu.dequantize().cpu(), layer.dequantize().cpu(), rtol=1e-5, atol=1e-6)
    # bf16 compute on the GPU
    bf16 = quant.Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    y = bf16(x.cuda())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().cpu(), y_cpu, rtol=0.05, atol=0.05)


# --- the bitsandbytes state dict ---

def test_state_dict_keys_dtypes_shapes_and_json():
    _, layer = make_layer(out_features=48, in_features=40, dtype=torch.bfloat16)
    sd = layer.state_dict()
    nblocks = 48 * 40 // 64
    expected = {
        "weight": (torch.uint8, (960, 1)),
        "bias": (torch.bfloat16, (48,)),
        "weight.absmax": (torch.uint8, (nblocks,)),
        "weight.quant_map": (torch.float32, (16,)),
        "weight.nested_absmax": (torch.float32, (1,)),
        "weight.nested_quant_map": (torch.float32, (256,)),
    }
    json_key = "weight.quant_state.bitsandbytes__nf4"
    assert list(sd) == list(expected) + [json_key]  # bitsandbytes' order
    for key, (dtype, shape) in expected.items():
        assert (sd[key].dtype, tuple(sd[key].shape)) == (dtype, shape), key
    assert torch.equal(sd["weight.quant_map"], quant.NF4_CODE)
    assert torch.equal(sd["weight.nested_quant_map"], dynamic_map(signed=True))
    text = bytes(sd[json_key].tolist()).decode("utf-8")
    offset = layer.offset.item()
    assert text == (
        '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [48, 40], '
        f'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {offset!r}}}'
    )
    assert torch.tensor(json.loads(text)["nested_offset"]).item() == offset

    _, plain = make_layer(bias=False, double_quant=False, quant_type="fp4", blocksize=128)
    sd = plain.state_dict()
    assert list(sd) == ["weight", "weight.absmax", "weight.quant_map",
                        "weight.quant_state.bitsandbytes__fp4"]
    assert sd["weight.absmax"].dtype == torch.float32
    info = json.loads(bytes(sd["weight.quant_state.bitsandbytes__fp4"].tolist()))
    assert info == {"quant_type": "fp4", "blocksize": 128, "dtype": "float32", "shape": [48, 40]}


def _same_layer(a: quant.Linear4bit, b: quant.Linear4bit):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip_adopts_the_file_layout(double_quant):
    _, layer = make_layer(double_quant=double_quant, blocksize=32, dtype=torch.float16)
    other = quant.Linear4bit(40, 48, compute_dtype=torch.float16)  # DQ, blocksize 64
    result = other.load_state_dict(layer.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    _same_layer(layer, other)
    assert other.blocksize == 32 and other.double_quant == double_quant
    x = torch.randn(3, 40, dtype=torch.float16)
    assert torch.equal(other(x), layer(x))


def test_meta_model_quantized_then_filled_with_assign():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 16, bias=False))
    quant.quantize(source)
    sd = source.state_dict()
    with torch.device("meta"):
        target = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 16, bias=False))
    quant.quantize(target)
    assert isinstance(target[0], quant.Linear4bit) and target[0].weight.is_meta
    assert list(target.state_dict()) == list(sd)  # the keys are known before loading
    target.load_state_dict(sd, assign=True)
    tensors = list(target.parameters()) + list(target.buffers())
    assert not any(t.is_meta for t in tensors)
    _same_layer(source[0], target[0])
    _same_layer(source[2], target[2])
    x = torch.randn(5, 40)
    assert torch.equal(target(x), source(x))


def test_full_precision_weights_are_quantized_on_load():
    linear = nn.Linear(40, 48)
    with torch.device("meta"):
        holder = nn.Sequential(nn.Linear(40, 48))
    quant.quantize(holder)
    holder.load_state_dict(nn.Sequential(linear).state_dict(), assign=True)
    _same_layer(holder[0], quant.Linear4bit.from_linear(linear))


def _bad(sd, key, value=None, delete=False):
    sd = dict(sd)
    if delete:
        del sd[key]
    else:
        sd[key] = value
    return sd


JSON = "weight.quant_state.bitsandbytes__nf4"


def _json_bytes(info) -> torch.Tensor:
    return torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("case,message", [
    ("missing absmax", r"missing weight\.absmax"),
    ("missing nested_absmax", r"missing weight\.nested_absmax"),
    ("missing nested_quant_map", r"missing weight\.nested_quant_map"),
    ("short absmax", r"weight\.absmax is torch\.uint8 \(29,\), expected torch\.uint8 \(30,\)"),
    ("float absmax", r"weight\.absmax is torch\.float32 \(30,\), expected torch\.uint8"),
    ("wrong quant_map", r"weight\.quant_map is not the nf4 codebook"),
    ("nested_absmax shape", r"weight\.nested_absmax is torch\.float32 \(2,\)"),
    ("malformed json", r"bitsandbytes__nf4 is not UTF-8 JSON"),
    ("json list", r"bitsandbytes__nf4 holds JSON list"),
    ("json shape", r"shape=\[40, 48\].*\[48, 40\]"),
    ("json blocksize", r"blocksize must be a power of two"),
    ("json dtype", r"has dtype='int8', expected one of"),
    ("json nested partial", r"nested_blocksize, nested_dtype and nested_offset"),
    ("json wrong type", r"quant_type='fp4'"),
    ("packed shape", r"weight is torch\.uint8 \(959, 1\), expected packed uint8 \(960, 1\)"),
    ("packed dtype", r"weight is torch\.float32 \(960, 1\)"),
    ("float weight shape", r"weight is torch\.float32 \(40, 48\) with no weight\.quant_state"),
    ("unknown quant_state", r"bitsandbytes__int4 is not one of"),
    ("bias shape", r"bias is torch\.float32 \(47,\)"),
])
def test_bad_state_dicts_name_the_key(case, message):
    _, layer = make_layer()
    sd = layer.state_dict()
    info = json.loads(bytes(sd[JSON].tolist()))
    bad = {
        "missing absmax": lambda: _bad(sd, "weight.absmax", delete=True),
        "missing nested_absmax": lambda: _bad(sd, "weight.nested_absmax", delete=True),
        "missing nested_quant_map": lambda: _bad(sd, "weight.nested_quant_map", delete=True),
        "short absmax": lambda: _bad(sd, "weight.absmax", sd["weight.absmax"][:-1]),
        "float absmax": lambda: _bad(sd, "weight.absmax", sd["weight.absmax"].float()),
        "wrong quant_map": lambda: _bad(sd, "weight.quant_map", quant.FP4_CODE),
        "nested_absmax shape": lambda: _bad(sd, "weight.nested_absmax", torch.ones(2)),
        "malformed json": lambda: _bad(sd, JSON, sd[JSON][:-3]),
        "json list": lambda: _bad(sd, JSON, _json_bytes([1, 2])),
        "json shape": lambda: _bad(sd, JSON, _json_bytes({**info, "shape": [40, 48]})),
        "json blocksize": lambda: _bad(sd, JSON, _json_bytes({**info, "blocksize": 48})),
        "json dtype": lambda: _bad(sd, JSON, _json_bytes({**info, "dtype": "int8"})),
        "json nested partial": lambda: _bad(sd, JSON, _json_bytes(
            {k: v for k, v in info.items() if k != "nested_dtype"})),
        "json wrong type": lambda: _bad(sd, JSON, _json_bytes({**info, "quant_type": "fp4"})),
        "packed shape": lambda: _bad(sd, "weight", sd["weight"][:-1]),
        "packed dtype": lambda: _bad(sd, "weight", sd["weight"].float()),
        "float weight shape": lambda: {"weight": torch.randn(40, 48), "bias": sd["bias"]},
        "unknown quant_state": lambda: {
            ("weight.quant_state.bitsandbytes__int4" if k == JSON else k): v for k, v in sd.items()},
        "bias shape": lambda: _bad(sd, "bias", torch.zeros(47)),
    }[case]()
    fresh = quant.Linear4bit(40, 48)
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(bad)


def test_missing_and_unexpected_keys_follow_torch_rules():
    _, layer = make_layer()
    sd = layer.state_dict()
    fresh = quant.Linear4bit(40, 48)
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != "bias"})
    with pytest.raises(RuntimeError, match="Unexpected key.*weight.extra"):
        fresh.load_state_dict({**sd, "weight.extra": torch.zeros(1)})
    result = fresh.load_state_dict({}, strict=False)
    assert result.missing_keys == ["weight", "bias"]


# --- interop with bitsandbytes (optional: skips when it is not installed) ---

def _bnb():
    try:
        import bitsandbytes.functional as bnb_f
    except Exception:
        pytest.skip("bitsandbytes is not importable")
    return bnb_f


@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_reads_our_state_dict_and_we_read_theirs(double_quant):
    bnb_f = _bnb()
    w = torch.randn(48, 64, dtype=torch.bfloat16)
    layer = quant.Linear4bit.from_weight(w, double_quant=double_quant)
    sd = layer.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    theirs = bnb_f.QuantState.from_dict(stats, device=torch.device("cpu"))
    assert theirs.shape == (48, 64) and theirs.dtype == torch.bfloat16 and theirs.blocksize == 64
    assert torch.equal(bnb_f.dequantize_4bit(sd["weight"], theirs), layer.dequantize())

    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=double_quant)
    their_sd = {"weight": packed, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}
    fresh = quant.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16)
    fresh.load_state_dict(their_sd)
    assert torch.equal(fresh.dequantize(), bnb_f.dequantize_4bit(packed, state))


def test_tile_codes_is_a_no_op_off_the_gpu():
    """quant/linear.py Note [tiled codes on the GPU]: on the CPU the codes stay in bitsandbytes' rows."""
    layer = quant.Linear4bit(64, 32)
    codes = layer.weight.detach().clone()
    assert layer.tile_codes() is False and not layer.codes_tiled
    assert torch.equal(layer.weight, codes) and layer.row_codes() is layer.weight
    assert quant.tile_codes(torch.nn.Sequential(layer)) == 0
