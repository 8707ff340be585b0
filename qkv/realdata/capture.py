"""Record per-layer K and V from a model's projection layers with forward hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

__all__ = ["KVRecorder", "to_heads"]


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D], float32, contiguous, detached."""
    return rearrange(x.detach().float(), "b s (h d) -> b h s d", h=heads).contiguous()


class KVRecorder:
    """Context manager: hooks ``(k_module, v_module)`` per layer and keeps every call's outputs.

    Each module must output ``[B, S, H*D]`` (a Linear projection, or a norm applied after it).
    After several forward passes, ``concat()`` returns per layer ``(k, v)`` of shape
    ``[B, H, sum(S), D]``, the passes concatenated along tokens in call order.
    """

    def __init__(self, layers: Sequence[tuple[nn.Module, nn.Module]], heads: int) -> None:
        self.layers = list(layers)
        self.heads = heads
        self.k: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.v: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, store: list[torch.Tensor]):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            store.append(to_heads(output, self.heads))

        return hook

    def __enter__(self) -> KVRecorder:
        for i, (k_mod, v_mod) in enumerate(self.layers):
            self._handles.append(k_mod.register_forward_hook(self._hook(self.k[i])))
            self._handles.append(v_mod.register_forward_hook(self._hook(self.v[i])))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def concat(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(k, v)``, each [B, H, S_total, D] float32."""
        return [(torch.cat(ks, dim=2), torch.cat(vs, dim=2)) for ks, vs in zip(self.k, self.v)]
