"""Pieces the benchmark scripts share (imported as ``common``: ``python bench/<script>.py`` puts ``bench/``
first on the import path): a saved teacher folder, and a tracker of live tensor memory on the CPU."""

from __future__ import annotations

from pathlib import Path


def save_minilm_teacher(folder: Path) -> Path:
    """MiniLM-L6 with a fresh 2-label head and its tokenizer, saved once into ``folder`` (a valid teacher
    for timing and memory; its accuracy is beside the point)."""
    import torch

    from kdqat_dist.models.encoders import load_classifier, load_tokenizer

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        load_classifier("minilm", 2).save_pretrained(folder)
        load_tokenizer("minilm").save_pretrained(folder)
    return folder


class LiveTensors:
    """Peak bytes of live tensor storages seen by a TorchDispatchMode (checked after every op)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                owner.seen(out)
                return out

        self.mode = Mode()
        self.refs: dict[int, tuple] = {}
        self.peak = 0

    def add(self, t) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        st = t.untyped_storage()
        ptr = st.data_ptr()
        known = self.refs.get(ptr)
        # a storage freed since the last check may have left its address to this one
        if ptr and (known is None or known[0].expired()):
            self.refs[ptr] = (StorageWeakRef(st), st.nbytes())

    def seen(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        # after every op: sampling every few ops missed peaks by ~25 MiB
        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
