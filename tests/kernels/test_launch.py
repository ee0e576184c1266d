"""alignlab.kernels.launch: the cached direct launch gives what ``kernel[grid]`` gives, whatever changes between calls."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from alignlab.kernels import launch as launch_mod  # noqa: E402
from alignlab.kernels.launch import launch  # noqa: E402


@triton.jit
def _axpb_kernel(x_ptr, y_ptr, out_ptr, n, stride, alpha, SCALE_Y: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs * stride, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALE_Y:
        y = y * 2.0
    tl.store(out_ptr + offs, (alpha * x + y).to(out_ptr.dtype.element_ty), mask=mask)


def _run(x, y, stride, alpha, scale_y, block=64):
    n = y.numel()
    out = torch.empty_like(y)
    launch(_axpb_kernel, (triton.cdiv(n, block),), (x, y, out, n, stride, alpha), dict(SCALE_Y=scale_y, BLOCK=block))
    return out


def _ref(x, y, stride, alpha, scale_y):
    return (alpha * x[:: stride][: y.numel()].float() + y.float() * (2.0 if scale_y else 1.0)).to(y.dtype)


CALLS = [  # (offset into the buffers, n, stride, alpha, SCALE_Y, dtype): alignment, ints of 1 / 16k, constexprs, dtypes
    (0, 256, 1, 1.5, False, torch.float32),
    (1, 255, 1, 1.5, False, torch.float32),    # pointers no longer 16-byte aligned, n odd
    (0, 256, 2, 1.5, False, torch.float32),    # stride 2 instead of the specialized 1
    (0, 1, 1, -0.5, False, torch.float32),     # n == 1
    (3, 100, 1, 2.0, True, torch.float32),     # another constexpr, another float
    (0, 64, 1, 1.0, False, torch.float16),     # another dtype
    (0, 256, 1, 1.5, False, torch.float32),    # back to the first key
]


def test_launch_matches_reference_across_changing_calls(kernel_device):
    g = torch.Generator().manual_seed(0)
    for off, n, stride, alpha, scale_y, dtype in CALLS * 2:  # the second round hits the cache
        xb = torch.randn(off + n * stride + 8, generator=g).to(kernel_device, dtype)
        yb = torch.randn(off + n + 8, generator=g).to(kernel_device, dtype)
        x, y = xb[off:], yb[off: off + n]
        got = _run(x, y, stride, alpha, scale_y)
        torch.testing.assert_close(got, _ref(x, y, stride, alpha, scale_y), rtol=1e-3, atol=1e-3)


@pytest.fixture
def fresh_launch_cache():
    """An empty launch cache on a Triton the fast launch is enabled for (else the test is skipped)."""
    if not launch_mod._ENABLED:
        pytest.skip(f"fast launch not enabled for triton {triton.__version__}")
    launch_mod._CACHE.clear()


@pytest.mark.cuda
def test_second_call_takes_the_direct_launcher(monkeypatch, fresh_launch_cache):
    x = torch.randn(512, device="cuda")
    y = torch.randn(512, device="cuda")
    first = _run(x, y, 1, 0.5, False)
    assert len(launch_mod._CACHE) == 1
    calls = []
    orig = _axpb_kernel.run
    monkeypatch.setattr(_axpb_kernel, "run", lambda *a, **k: calls.append(1) or orig(*a, **k))
    second = _run(x, y, 1, 0.5, False)
    assert calls == []  # Triton's binder was not involved
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    _run(x[1:], y[1:], 1, 0.5, False)  # misaligned: a new key, through Triton again
    assert calls == [1] and len(launch_mod._CACHE) == 2


def test_host_cdiv_and_next_power_of_2_match_triton():
    """The host-side helpers give Triton's own values (they replace triton.cdiv / triton.next_power_of_2, whose
    Python calls cost microseconds)."""
    from alignlab.kernels.launch import cdiv, next_power_of_2

    for n in list(range(1, 1100)) + [2**20 - 1, 2**20, 2**20 + 1, 3 * 2**31]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 7, 16, 256, 4096):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert cdiv(0, 16) == 0


def test_silent_launch_hooks():
    """A hook chain with nothing in it counts as no hook (the direct launch may skip it); anything else does not."""
    chain_cls = getattr(triton.knobs, "HookChain", None)
    assert launch_mod._silent(None)
    assert not launch_mod._silent(lambda metadata: None)
    if chain_cls is None:
        pytest.skip(f"triton {triton.__version__} has no HookChain")
    chain = chain_cls()
    assert launch_mod._silent(chain)
    chain.add(lambda metadata: None)
    assert not launch_mod._silent(chain)


def test_pointers_replace_tensors_only():
    t = torch.zeros(3)
    assert launch_mod.pointers((t, 5, None, 1.5, True)) == (t.data_ptr(), 5, None, 1.5, True)


@pytest.mark.cuda
def test_direct_c_launch_skips_the_wrapper_until_a_hook_is_registered(monkeypatch, fresh_launch_cache):
    """On the Triton release the direct launch was checked on, a cached launch calls the compiled launcher's C entry
    point (not Triton's Python wrapper) and gives the same bits; with a launch hook registered it goes through the
    wrapper again, and the hook sees the launch."""
    x = torch.randn(1000, device="cuda")
    y = torch.randn(1000, device="cuda")
    first = _run(x, y, 1, 0.5, True)
    (compiled, _, direct), = launch_mod._CACHE.values()
    if triton.__version__.rsplit(".", 1)[0] != launch_mod._DIRECT_VERSION:
        assert direct is None
        pytest.skip(f"direct launch not enabled for triton {triton.__version__}")
    assert direct is not None
    wrapper_calls = []
    wrapper = compiled.run  # Triton's Python launcher (a property of the compiled kernel in Triton 3.6)
    spy = lambda *a: wrapper_calls.append(1) or wrapper(*a)  # noqa: E731
    monkeypatch.setattr(type(compiled), "run", property(lambda self: spy))
    second = _run(x, y, 1, 0.5, True)
    assert wrapper_calls == []
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        third = _run(x, y, 1, 0.5, True)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert wrapper_calls == [1] and len(seen) == 1
    torch.testing.assert_close(third, first, rtol=0, atol=0)
    _run(x, y, 1, 0.5, True)
    assert wrapper_calls == [1]  # the hook removed: direct again
