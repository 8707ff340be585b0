"""What every pipeline adapter shares: qkv.adapters.<client>, the handle, and putting things back."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import qkv
from qkv.caches.adapters.handle import AdapterHandle, Patches, attend_parts, pending_memory
from qkv.errors import CacheError, ConfigError


def test_qkv_adapters_names_the_clients_and_loads_none_on_import():
    roots = ("diffusers", "models", "flashdreams", "longcat_video", "hyvideo")
    code = ("import sys, qkv; a = qkv.adapters; assert 'qkv.caches.adapters.sana_wm' not in sys.modules; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {roots}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert qkv.adapters.sana_wm.install is not None and qkv.adapters.self_forcing.install is not None
    clients = "self_forcing, streamdiffusionv2, anyflow_far, sana_wm, flashdreams, longcat_video, hy_worldplay"
    with pytest.raises(AttributeError, match=f"clients: {clients}"):
        qkv.adapters.nope  # noqa: B018


def test_patches_restore_instance_attributes_newest_first():
    module = torch.nn.Linear(2, 2)
    patches = Patches()
    patches.set(module, "forward", lambda x: x)
    patches.set(module, "forward", lambda x: 2 * x)
    patches.set(module, "extra", 1)
    assert module(torch.ones(2)).sum() == 4
    patches.undo()
    assert "forward" not in vars(module) and not hasattr(module, "extra")
    assert torch.equal(module(torch.ones(2)), torch.nn.Linear.forward(module, torch.ones(2)))


def test_a_removed_handle_refuses_work_and_fixed_options_are_refused():
    handle = AdapterHandle("client", "bf16", {"span_chunks": 2})
    cache = handle.build_cache(2)
    assert handle.build_cache(2) is cache and cache.config.span_chunks == 2
    cache.append(0, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    assert handle.memory().tokens == 4
    handle.reset()
    assert handle.memory().tokens == 0
    with handle:
        pass
    with pytest.raises(CacheError, match="removed"):
        handle.check_installed()
    with pytest.raises(ConfigError, match="num_layers"):
        AdapterHandle("client", "bf16", {"num_layers": 3}, fixed=("num_layers",))


def test_pending_chunks_count_as_full_precision():
    k = torch.zeros(1, 2, 5, 8, dtype=torch.bfloat16)
    mem = pending_memory([(k, k), (k, k)])
    assert mem.tail == 4 * k.numel() * 2 and mem.tokens == 10 and mem.bits_per_element == 16


@pytest.mark.parametrize("attention", ["fused", "staged", "read"])
def test_attend_parts_equals_one_attention_over_everything(attention):
    gen = torch.Generator().manual_seed(0)
    cache = qkv.KVCache("fp32", span_chunks=2, attention=attention)
    chunks = [torch.randn(1, 2, 6, 8, generator=gen) for _ in range(5)]
    for c in chunks:
        cache.append(0, c, c + 1)
    dense = (torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, 3, 8, generator=gen))
    extra = (torch.randn(1, 2, 4, 8, generator=gen), torch.randn(1, 2, 4, 8, generator=gen))
    q = torch.randn(1, 2, 4, 8, generator=gen)
    empty = qkv.KVCache("fp32").layer(0)  # never appended: skipped
    out = attend_parts(cache.config, q, [dense, cache.layer(0), empty, extra])
    k = torch.cat([dense[0], *chunks, extra[0]], 2)
    v = torch.cat([dense[1], *(c + 1 for c in chunks), extra[1]], 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - ref).abs().max() <= 1e-5
