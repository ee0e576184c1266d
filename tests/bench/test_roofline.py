"""Roofline helpers: measured, cached per process, validated."""

import pytest
import torch

from alignlab.bench import copy_bandwidth, matmul_tflops


def test_copy_bandwidth_is_cached_and_plausible():
    bw = copy_bandwidth("cpu", nbytes=8 << 20)
    assert copy_bandwidth("cpu", nbytes=8 << 20) == bw  # same object from the cache, no re-measure
    assert 1e7 < bw < 1e13  # between 10 MB/s (a heavily loaded machine) and 10 TB/s on any CPU


def test_matmul_tflops_is_cached_and_plausible():
    t = matmul_tflops("cpu", torch.float32, n=128)
    assert matmul_tflops("cpu", torch.float32, n=128) == t
    assert 1e-6 < t < 100  # a plausible number, not a timing: 5e-5 was measured at a load average of 10


def test_bad_arguments():
    with pytest.raises(ValueError, match="nbytes"):
        copy_bandwidth("cpu", nbytes=3)
    with pytest.raises(TypeError, match="dtype"):
        matmul_tflops("cpu", torch.int32)
    with pytest.raises(ValueError, match="n must"):
        matmul_tflops("cpu", torch.float32, n=0)


@pytest.mark.cuda
def test_cuda_rooflines_near_datasheet():
    bw = copy_bandwidth()
    tf = matmul_tflops()
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        assert 2.0e12 < bw < 5.5e12, bw
        assert 500 < tf < 1000, tf
    else:
        assert bw > 1e10 and tf > 1


def test_meta_device_is_refused():
    # a "copy" of meta tensors takes no time: it reported ~10^14 bytes/s
    with pytest.raises(ValueError, match="CPU or CUDA"):
        copy_bandwidth("meta", nbytes=1 << 12)
    with pytest.raises(ValueError, match="CPU or CUDA"):
        matmul_tflops("meta", torch.float32, n=8)
