"""chunk_softmax_grad_ with a saved lse (the gradient pass alone): the mean, the entropy and E_t come from the
statistics pass, so both implementations return None for them; the Triton launcher handed back buffers it
never wrote (uninitialised memory) while the reference recomputed the mean."""

import pytest
import torch

from alignlab.kernels.linear_logprobs import chunk_softmax_grad_


@pytest.mark.parametrize("want", ["want_mean", "want_entropy"])
def test_a_saved_lse_gives_no_pass_statistics(kernel_mode, want):
    logits = torch.randn(3, 9)
    labels = torch.tensor([0, 4, 8])
    st = chunk_softmax_grad_(logits.clone(), labels)
    z = logits.clone()
    again = chunk_softmax_grad_(z, labels, lse=st.lse, grad_scale=torch.ones(3), **{want: True})
    assert again.mean is None and again.entropy is None and again.expected is None
    torch.testing.assert_close(again.target, st.target)
    want_dz = torch.softmax(logits, 1) - torch.nn.functional.one_hot(labels, 9)
    torch.testing.assert_close(z, want_dz)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.float32])
def test_labels_must_be_int32_or_int64_on_both_paths(kernel_mode, dtype):
    # the reference's gather refused these with a RuntimeError while the kernel read them as indices
    with pytest.raises(TypeError, match="labels"):
        chunk_softmax_grad_(torch.randn(3, 5), torch.tensor([0, 1, 4]).to(dtype))
