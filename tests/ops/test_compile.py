"""The Triton kernels inside ``torch.compile(fullgraph=True)``: the custom ops trace without graph
breaks and the compiled function returns what the eager one does (CPU: interpreter + aot_eager;
CUDA: inductor, and a CUDA-graph replay)."""

import pytest
import torch

import blocksieve
from blocksieve import BlockLayout, TokenLayout
from tests.helpers import qkv, random_block_layout, random_token_layout

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
BACKEND = "inductor" if ON_CUDA else "aot_eager"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _block_attend(q, k, v, indices, counts):
    layout = BlockLayout(indices, counts, 64, 32, q.shape[2], k.shape[2], True)
    out, lse = blocksieve.attend(q, k, v, layout, return_lse=True, backend="triton")
    return out * 2.0, lse  # an op around the kernel, so the graph is more than the custom op


def _token_attend(q, k, v, indices, _counts):
    layout = TokenLayout(indices, q.shape[2], k.shape[2], True)
    return blocksieve.attend(q, k, v, layout, return_lse=True, backend="triton")


@pytest.mark.parametrize("kind", ["block", "token"])
def test_compiled_fullgraph_equals_eager(kind):
    torch._dynamo.reset()
    q, k, v = qkv(1, 4, 2, 128, 128, 64, dtype=torch.float16, device=DEVICE)
    if kind == "block":
        layout, fn = random_block_layout(1, 4, 128, 128, 64, 32, p=0.6, device=DEVICE), _block_attend
    else:
        layout, fn = random_token_layout(1, 2, 128, 128, 24, device=DEVICE), _token_attend
    args = (q, k, v, layout.indices, layout.counts)
    eager_out, eager_lse = fn(*args)
    compiled = torch.compile(fn, fullgraph=True, backend=BACKEND)
    out, lse = compiled(*args)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, eager_lse, rtol=0, atol=0)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_eager():
    q, k, v = qkv(2, 8, 2, 1, 4096, 128, dtype=torch.bfloat16, device=DEVICE)
    layout = random_token_layout(2, 2, 1, 4096, 512, device=DEVICE)
    eager, _ = blocksieve.attend(q, k, v, layout, return_lse=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = blocksieve.attend(q, k, v, layout, return_lse=True)
    q.normal_()  # replay reads the new query
    graph.replay()
    fresh, _ = blocksieve.attend(q, k, v, layout, return_lse=True)
    torch.testing.assert_close(captured, fresh, rtol=0, atol=0)
    assert not torch.equal(fresh, eager)
