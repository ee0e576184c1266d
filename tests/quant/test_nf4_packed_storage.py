"""NF4Linear keeps its quantization tensors as views of two storages (``linear._Packed``), and a compiled forward
reads those two tensors instead of the four or five buffers: fewer graph inputs, less host work per compiled call
(each input is handled per call by Dynamo and by a CUDA-graph replay; issue 24, the twenty-third pass in
benchmarks/RESULTS.md). These tests hold the views and the storages together through everything that moves or
replaces the buffers, and check that a compiled forward gives the eager output with the fewer inputs."""

import copy
import pickle

import pytest
import torch
from torch import nn

from alignlab.quant import NF4Linear
from alignlab.quant.linear import _BUFFERS


def _layer(double_quant=True, calibrate=None, bias=True, shape=(24, 128)):
    torch.manual_seed(0)
    dense = nn.Linear(shape[1], shape[0], bias=bias)
    return NF4Linear.from_linear(dense, blocksize=64, double_quant=double_quant, compute_dtype=torch.float32,
                                 calibrate=calibrate)


def _views_of_packed(layer) -> bool:
    packed = layer.__dict__.get("_packed")
    if packed is None:
        return False
    u8, f32 = packed.u8.untyped_storage().data_ptr(), packed.f32.untyped_storage().data_ptr()
    for name in _BUFFERS:
        buf = layer._buffers[name]
        if buf is not None and buf.untyped_storage().data_ptr() not in (u8, f32):
            return False
    return all(layer._buffers[n] is v for n, v in zip(_BUFFERS, packed.views))


def _graph_inputs(module, x):
    """(output, number of tensor inputs of the one graph Dynamo captured)."""
    counts = []

    def backend(gm, example_inputs):
        counts.append(sum(isinstance(t, torch.Tensor) for t in example_inputs))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend, fullgraph=True)(x)
    assert len(counts) == 1
    return out, counts[0]


@pytest.mark.parametrize("double_quant,calibrate", [(True, None), (False, None), (True, "icq"), (False, "icq")])
def test_buffers_are_views_of_two_storages_with_the_quantized_values(double_quant, calibrate):
    layer = _layer(double_quant, calibrate)
    assert _views_of_packed(layer)
    t = layer.quant_weight
    ref = _layer(double_quant, calibrate).quant_weight  # the same weight, quantized again
    for name, a, b in [("data", t.data, ref.data), ("absmax", t.absmax, ref.absmax),
                       ("nested_absmax", t.nested_absmax, ref.nested_absmax),
                       ("nested_offset", t.nested_offset, ref.nested_offset), ("shift", t.shift, ref.shift)]:
        if b is None:
            assert a is None, name
        else:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    packed = layer.__dict__["_packed"]
    assert packed.u8.dtype == torch.uint8 and packed.f32.dtype == torch.float32
    for view in packed.views:  # every piece starts 16 bytes apart from its storage's start (as an allocation would)
        if view is not None:
            assert (view.data_ptr() - view.untyped_storage().data_ptr()) % 16 == 0


@pytest.mark.parametrize("double_quant,calibrate", [(True, None), (False, "icq")])
def test_compiled_forward_reads_two_tensors_and_matches_eager(double_quant, calibrate):
    layer = _layer(double_quant, calibrate)
    x = torch.randn(5, 128)
    eager = layer(x)
    out, n_inputs = _graph_inputs(layer, x)
    assert torch.equal(out, eager)
    # a layer whose packed form is dropped (a buffer replaced by hand) reads its buffers: same output, and one
    # graph input per buffer where the packed layer has two (x, the bias and the codebook tables in both)
    plain = _layer(double_quant, calibrate)
    plain.qdata = plain.qdata.clone()
    assert "_packed" not in plain.__dict__
    out, n_plain = _graph_inputs(plain, x)
    buffers = sum(b is not None for b in plain.buffers())
    assert buffers == (4 if double_quant else 2) + (calibrate is not None)
    assert torch.equal(out, eager) and n_plain - n_inputs == buffers - 2


def test_the_switch_off_reads_the_buffers(monkeypatch):
    from alignlab.quant import linear

    layer = _layer()
    x = torch.randn(2, 128)
    _, packed_inputs = _graph_inputs(layer, x)
    monkeypatch.setattr(linear, "PACKED_INPUTS", False)
    out, buffer_inputs = _graph_inputs(layer, x)
    assert torch.equal(out, layer(x)) and buffer_inputs == packed_inputs + 2


def test_a_replaced_buffer_is_what_compiled_and_eager_forwards_read():
    layer = _layer()
    x = torch.randn(3, 128)
    other = _layer(shape=(24, 128))
    with torch.no_grad():
        other_w = nn.Linear(128, 24).weight * 3
    other.load_dense_weight_(other_w)
    assert _views_of_packed(other)  # re-quantizing packs anew
    for name in ("qdata", "qabsmax"):
        setattr(layer, name, getattr(other, name).clone())
    layer.register_buffer("qnested_absmax", other.qnested_absmax.clone(), persistent=False)
    layer.qnested_offset = other.qnested_offset.clone()
    assert "_packed" not in layer.__dict__
    want = nn.functional.linear(x, other.dequantize(torch.float32), layer.bias)
    assert torch.equal(layer(x), want)
    out, _ = _graph_inputs(layer, x)
    assert torch.equal(out, want)


@pytest.mark.parametrize("double_quant", [True, False])
def test_compiled_functional_call_reads_the_swapped_in_tensors(double_quant):
    """``torch.func.functional_call`` puts other tensors in ``_buffers`` without the module's setattr (which drops
    the packed form): a compiled forward read the layer's own storages then, giving its weight with the other
    layer's bias (found by a helper, 2026-12-07). Now the packed storages are read only while the buffers are their
    views."""
    from torch.func import functional_call

    a, b = _layer(double_quant), _layer(double_quant)
    with torch.no_grad():
        b.load_dense_weight_(torch.randn(24, 128))
        b.bias.normal_()
    x = torch.randn(3, 128)
    state = {**dict(b.named_parameters()), **dict(b.named_buffers())}
    try:
        got = torch.compile(lambda x, state: functional_call(a, state, (x,)), fullgraph=True, backend="eager")(x, state)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, b(x), rtol=0, atol=0)
    # the layer's own compiled forward still reads its two storages, where a layer reading its buffers has four
    # (double quantization) or two
    plain = _layer(double_quant)
    plain.qdata = plain.qdata.clone()
    assert _views_of_packed(a) and _graph_inputs(plain, x)[1] - _graph_inputs(a, x)[1] == (2 if double_quant else 0)


def test_moves_copies_and_loads_keep_the_views_on_their_storages():
    layer = _layer()
    x = torch.randn(4, 128)
    want = layer(x)
    for copy_of in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert _views_of_packed(copy_of) and torch.equal(copy_of(x), want)
        assert copy_of.qdata.data_ptr() != layer.qdata.data_ptr()
    moved = copy.deepcopy(layer).to("meta")
    assert _views_of_packed(moved) and moved.qdata.is_meta and moved.__dict__["_packed"].u8.is_meta
    moved.to_empty(device="cpu")
    assert _views_of_packed(moved) and not moved.qdata.is_meta
    moved.load_state_dict(layer.state_dict())
    assert _views_of_packed(moved) and torch.equal(moved(x), want)
    half = copy.deepcopy(layer).half()  # a floating cast leaves the codes and float32 scales as they are
    assert _views_of_packed(half) and half.qnested_absmax.dtype == torch.float32
    assert torch.equal(half.qdata, layer.qdata)
    # a move that keeps the device keeps the very storages
    same = layer.to("cpu")
    assert same is layer and _views_of_packed(layer)
    # an in-place write to a buffer is a write to the packed storage (what the compiled forward reads)
    with torch.no_grad():
        layer.qdata.zero_()
    assert torch.equal(layer.__dict__["_packed"].u8[:layer.qdata.numel()], layer.qdata)
    out, _ = _graph_inputs(layer, x)
    assert torch.equal(out, layer(x)) and not torch.equal(out, want)


def test_a_buffer_replaced_while_moving_falls_back_to_the_buffers():
    layer = _layer()
    x = torch.randn(2, 128)
    want = layer(x)
    layer._buffers["qshift"] = None  # already None: the packed form stays
    assert _views_of_packed(layer)
    layer._buffers["qdata"] = layer._buffers["qdata"].clone()  # behind __setattr__'s back
    layer.to("cpu")  # a move finds a buffer that is not its view: the packed form is dropped
    assert "_packed" not in layer.__dict__
    assert torch.equal(layer(x), want)
    out, _ = _graph_inputs(layer, x)
    assert torch.equal(out, want)


def test_shardable_conversion_gives_each_parameter_storage_of_its_own():
    from alignlab.quant.fsdp import shardable_nf4_

    model = nn.Sequential(_layer())
    x = torch.randn(3, 128)
    want = model(x)
    shardable_nf4_(model)
    lay = model[0]
    assert "_packed" not in lay.__dict__
    assert lay.qdata.untyped_storage().data_ptr() != lay.qabsmax.untyped_storage().data_ptr()
    assert isinstance(lay.qdata, nn.Parameter) and torch.equal(model(x), want)
    out, _ = _graph_inputs(model, x)
    assert torch.equal(out, want)


def test_dynamo_marks_the_storages_static_as_it_marks_buffers():
    """The storages were marked with torch._dynamo.mark_static_address at every move to a GPU, which cannot be
    traced (a repack inside a compiled region raised on CUDA) and imported torch._dynamo in processes that never
    compile. Dynamo marks tensor attributes of a module static itself (unguarded, as buffers): checked here."""
    layer = _layer()
    packed = layer.__dict__["_packed"]
    assert getattr(packed.u8, "_dynamo_static_input_type", None) is None
    _graph_inputs(nn.Sequential(layer), torch.randn(3, 128))
    assert getattr(packed.u8, "_dynamo_static_input_type", None) == "unguarded"
    assert getattr(packed.f32, "_dynamo_static_input_type", None) == "unguarded"


def test_buffers_moved_by_data_assignment_leave_the_packed_storages():
    """FSDP2 moves the buffers of a layer it does not shard with `tensor.data = tensor.to(device)`: the buffer
    objects stay, so the compiled forward took them for the packed storages' views and read the storages left on
    the old device (a helper's find), and the storages kept a copy of the weight there. The views' device is
    checked now (traced: a guard), and an eager forward drops the stale storages."""
    from alignlab.quant.linear import _holds

    layer = _layer()
    packed = layer.__dict__["_packed"]
    assert _holds(packed, layer._buffers, storages=False)
    # one CPU here: the views (moved by `.data =`) and the storages (left behind) on two devices, the other way round
    layer.__dict__["_packed"] = stale = packed._replace(u8=packed.u8.to("meta"), f32=packed.f32.to("meta"))
    assert not _holds(stale, layer._buffers, storages=False)
    x = torch.randn(3, 128)
    want = layer(x)  # the eager read drops the stale storages
    assert "_packed" not in layer.__dict__
    out, _ = _graph_inputs(layer, x)
    assert torch.equal(out, want)


def test_an_unpickled_layer_notes_its_device(monkeypatch):
    """Unpickling (torch.load with map_location="cuda") repacked the buffers but never looked the device up: a
    compiled first call traced the fallback launch rules and made the kernels' code table per call."""
    import alignlab.quant.linear as linear

    seen = []
    monkeypatch.setattr(linear, "note_device", seen.append)
    layer = pickle.loads(pickle.dumps(_layer()))
    assert seen == [layer.qdata.device] and _views_of_packed(layer)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 16, 40, 300])
def test_cuda_graph_replays_read_the_packed_storages_in_place(rows):
    """On the GPU the two storages are static addresses for CUDA graphs (as buffers are): a reduce-overhead
    compiled layer gives the eager bits at decode sizes (the small-M kernels read the sliced views) and above,
    and follows an in-place change of the codes without re-recording."""
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(4096, 1024, dtype=torch.bfloat16), compute_dtype=torch.bfloat16).cuda()
    packed = layer.__dict__["_packed"]
    assert packed.u8.is_cuda and _views_of_packed(layer)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    f = torch.compile(layer, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            y = f(x).clone()
        assert torch.equal(y, layer(x))
        assert getattr(packed.u8, "_dynamo_static_input_type", None) == "unguarded"  # Dynamo's own marking
        assert getattr(packed.f32, "_dynamo_static_input_type", None) == "unguarded"
        layer.qdata[: layer.qdata.numel() // 2].bitwise_xor_(0x11)  # other codes, the same addresses
        want = layer(x)
        assert not torch.equal(want, y) and torch.equal(f(x), want)


@pytest.mark.cuda
def test_a_gpu_move_keeps_the_dynamic_map_and_repacks_traceably():
    """note_device keeps double quantization's dynamic map of the GPU (a compiled first call read the CPU one as a
    graph input, copied per call); a repack inside a compiled region (load_dense_weight_) is a graph break, not
    the AssertionError of mark_static_address's forbid_in_graph."""
    from alignlab.quant import nf4

    layer = NF4Linear.from_linear(nn.Linear(256, 64), compute_dtype=torch.float32).cuda()
    assert ("dynamic", layer.qdata.device) in nf4._TABLES
    dense = torch.randn(64, 256, device="cuda")
    torch._dynamo.reset()
    torch.compile(lambda: layer.load_dense_weight_(dense))()
    assert _views_of_packed(layer)
