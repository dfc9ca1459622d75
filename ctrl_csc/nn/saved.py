"""Bytes held for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``.

Used by ``bench/bench_memory.py`` and the memory tests of the solver's backward modes; works on
any device (CPU included), unlike the CUDA allocator's statistics.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["SavedBytes"]


class SavedBytes:
    """Live and peak bytes of the distinct storages saved for backward (a storage saved by two
    operations counts once): ``live`` now, ``peak`` the most at any time, including what a
    replay in backward saves. ``with counter.hooks(): ...`` counts the autograd work inside."""

    class _Holder:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    def __init__(self) -> None:
        self.refs: dict[tuple[str, int], int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: tuple[str, int], nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        key, nbytes = (str(t.device), st.data_ptr()), st.nbytes()
        if key not in self.refs:
            self.refs[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        holder = self._Holder(t)
        weakref.finalize(holder, self._release, key, nbytes)
        return holder

    @staticmethod
    def unpack(holder) -> torch.Tensor:
        return holder.t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
