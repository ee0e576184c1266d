"""Fixtures shared by the loss tests."""

import pytest

import alignlab.losses.logprobs as logprobs


@pytest.fixture(params=[3, 13], ids=["pieces_of_a_row", "rows_together"])
def small_chunks(monkeypatch, request):
    """A chunk budget of 3 or 13 fp32 rows of the test module's ``VOCAB`` (far below the real budget): pieces of
    one sequence, or several whole sequences per chunk. Returns the rows per chunk."""
    monkeypatch.setattr(logprobs, "_CPU_CHUNK_BYTES", request.param * request.module.VOCAB * 4)
    return request.param
