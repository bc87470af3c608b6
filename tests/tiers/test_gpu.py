"""The GPU pool tier: conformance and device-side leases; skipped on machines without CUDA.

The allocator and pool logic it shares with the pinned tier are tested on the CPU (test_allocator.py,
test_pinned.py).
"""

from __future__ import annotations

import pytest

from kdn.node.tiers.pinned import CHUNK_HEADER_ALLOWANCE
from tests.tiers.conformance import TierConformance, make_key, make_object, object_size

torch = pytest.importorskip("torch")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_tier_class_imports_without_cuda():
    from kdn.node.tiers import tier_class

    assert tier_class("gpu").kind == "gpu"
    if not torch.cuda.is_available():
        from kdn.errors import ConfigError

        with pytest.raises(ConfigError, match="CUDA"):
            tier_class("gpu")(1 << 20)


@needs_cuda
class TestGPUTier(TierConformance):
    def make_tier(self, capacity, tmp_path):
        from kdn.node.tiers.gpu import GPUTier

        fits = capacity >= object_size()
        return GPUTier(capacity, granularity_bytes=1, min_pages=4,
                       chunk_bytes=[object_size() - CHUNK_HEADER_ALLOWANCE] if fits else [])

    @pytest.fixture(autouse=True)
    def _no_pins_left(self, tiers):
        yield
        assert all(t.outstanding_leases == 0 for t in tiers.open)


@pytest.fixture
def gpu_tier():
    from kdn.node.tiers.gpu import GPUTier

    tier = GPUTier(64 << 20, chunk_bytes=["4MiB"])
    yield tier
    assert tier.outstanding_leases == 0
    tier.close()


@needs_cuda
def test_lease_is_a_device_view(gpu_tier):
    key = make_key("g")
    data = make_object(key, 4 << 20)  # several staging pieces
    assert gpu_tier.put(key, data)
    with gpu_tier.get_tensor(key) as lease:
        t = lease.tensor
        assert t.device.type == "cuda" and t.dtype == torch.uint8 and t.numel() == len(data)
        assert bytes(t.cpu().numpy()) == data
        with pytest.raises(Exception, match="Lease.tensor"):
            lease.view()
    assert bytes(gpu_tier.get(key)) == data


@needs_cuda
def test_put_device_tensor_and_evict_to_host(gpu_tier):
    evicted: dict[str, bytes] = {}
    gpu_tier.on_evict = lambda k, d: evicted.__setitem__(k, bytes(d))
    keys = [make_key(i) for i in range(40)]
    objs = {k: make_object(k, 3 << 20) for k in keys}
    for k in keys:
        assert gpu_tier.put(k, torch.frombuffer(bytearray(objs[k]), dtype=torch.uint8).cuda())
    assert evicted and all(evicted[k] == objs[k] for k in evicted)
    resident = [k for k, _ in gpu_tier.keys()]
    assert [bytes(b) for b in gpu_tier.get_many(resident)] == [objs[k] for k in resident]


@needs_cuda
def test_leased_object_survives_churn(gpu_tier):
    key = make_key("held")
    data = make_object(key, 2 << 20)
    gpu_tier.put(key, data)
    lease = gpu_tier.lease(key)
    before = lease.tensor.clone()
    for i in range(60):
        k = make_key(f"churn{i}")
        gpu_tier.put(k, make_object(k, 3 << 20))
    assert gpu_tier.contains(key) and torch.equal(lease.tensor, before)
    lease.release()
