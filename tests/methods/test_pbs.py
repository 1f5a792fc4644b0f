import pytest
import torch

import blocksieve
from blocksieve.ops.reference import reference_attention
from tests.helpers import qkv
from tests.methods.test_flexprefill import DEVICE, topic_qkv


def brute_pbs_tokens(q, k, segment, block, last_q, tau):
    """Token mask [1, Hq, Lq, Lkv] of PBS's rule in original positions, by loops."""
    _, hq, lq, d = q.shape
    lkv, hkv = k.shape[2], k.shape[1]
    g = hq // hkv
    perms = []
    for kh in range(hkv):
        imp = torch.zeros(lkv)
        for h in range(kh * g, (kh + 1) * g):
            for r in range(lq - last_q, lq):
                pos = lkv - lq + r
                imp[: pos + 1] += torch.softmax(q[0, h, r] @ k[0, kh, : pos + 1].T / d**0.5, 0) / (last_q * g)
        perm = list(range(lkv))
        for s0 in range(0, lkv - segment + 1, segment):
            perm[s0 : s0 + segment] = sorted(range(s0, s0 + segment), key=lambda i: -float(imp[i]))
        perms.append(perm)
    mask = torch.zeros(1, hq, lq, lkv, dtype=torch.bool)
    for h in range(hq):
        perm = perms[h // g]
        kp = k[0, h // g, perm]
        nblk = -(-lkv // block)
        kbar = torch.stack([kp[j * block : (j + 1) * block].mean(0) for j in range(nblk)])
        sink = perm.index(0) // block
        for n in range(-(-lq // block)):
            r0, r1 = n * block, min((n + 1) * block, lq)
            seg0 = (lkv - lq + r0) // segment * segment
            earlier = [j for j in range(nblk) if (j + 1) * block <= seg0]
            keep = set()
            if earlier:
                sc = torch.tensor([float(q[0, h, r0:r1].mean(0) @ kbar[j] / d**0.5) for j in earlier]).softmax(0)
                acc = 0.0
                for i in sorted(range(len(earlier)), key=lambda i: -float(sc[i])):
                    if acc >= tau:
                        break
                    keep.add(earlier[i])
                    acc += float(sc[i])
                if sink in earlier:
                    keep.add(sink)
            for j in keep:
                for t in range(j * block, min((j + 1) * block, lkv)):
                    mask[0, h, r0:r1, perm[t]] = True
            mask[0, h, r0:r1, seg0:] = True
    pos = torch.arange(lkv - lq, lkv)[:, None]
    return mask & (torch.arange(lkv)[None, :] <= pos)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lq,lkv", [(160, 160), (100, 170)], ids=["L160", "Lq100-Lkv170"])
def test_pbs_matches_brute_force_and_call_equals_select(lq, lkv, backend):
    q, k, v = qkv(1, 4, 2, lq, lkv, 8)
    m = blocksieve.method("pbs", segment=32, block=16, last_q=16, tau=0.6, backend=backend)
    want_mask = brute_pbs_tokens(q, k, 32, 16, 16, 0.6)
    if backend == "triton":
        q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    lay = m.select(q, k)
    lay.validate()
    assert torch.equal(lay.to_dense_mask().cpu(), want_mask)
    out, lse = m(q, k, v, return_lse=True)
    want, want_lse = reference_attention(q, k, v, lay)
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)


@pytest.mark.parametrize("permute", [True, False])
def test_pbs_triton_plan_equals_torch(permute):
    """The kernel path writes the permuted rows the PyTorch path builds, on inputs without near-ties."""
    q, k = topic_qkv(2, 4, 2, 150, 290, 16)
    cfg = {"segment": 32, "block": 16, "last_q": 16, "tau": 0.8, "permute": permute}
    perm, want, own = blocksieve.method("pbs", backend="torch", **cfg).plan(q, k)
    perm_t, got, own_t = blocksieve.method("pbs", backend="triton", **cfg).plan(q.to(DEVICE), k.to(DEVICE))
    got.validate()
    assert torch.equal(perm_t.cpu(), perm) and torch.equal(own_t.indices.cpu(), own.indices)
    assert 0.5 < float(want.counts.float().mean()) < 0.7 * want.indices.shape[-1]
    assert torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.counts.cpu(), want.counts)


def test_pbs_rejects_bad_config():
    with pytest.raises(ValueError, match="multiple of block"):
        blocksieve.method("pbs", segment=100, block=64)
    with pytest.raises(ValueError, match="tau"):
        blocksieve.method("pbs", tau=2.0)


def test_own_segment_parts_are_shared_per_shape():
    """The shape-only parts are built once per shape and equal what a fresh build gives."""
    from blocksieve.methods.pbs import own_segment_parts

    q, k, _ = qkv(1, 4, 2, 300, 300, 16)
    m = blocksieve.method("pbs", segment=64, block=32)
    a, b = m.plan(q, k)[2], m.plan(q, k)[2]
    assert a is b
    seg0, fresh = own_segment_parts.__wrapped__(32, 64, 1, 2, 300, 300, q.device)
    assert torch.equal(a.indices, fresh.indices) and torch.equal(a.counts, fresh.counts)
    assert torch.equal(seg0, torch.div(torch.arange(0, 300, 32), 64, rounding_mode="floor") * 64)
    assert m.plan(q[:, :, :200], k[:, :, :250])[2] is not a
