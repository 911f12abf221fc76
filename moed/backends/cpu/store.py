"""ExpertStore: one cache file per model holding every MoE layer's experts in
the kernel's tile layout (`<model>-<key>.moex`): a packed store file
(packed_file.py, built by packed_writer.py) with one section per layer, mapped
read-only and shared, so two processes serving the same model hold its experts
once in host memory.
"""
from functools import partial
from pathlib import Path

from moed.errors import CheckpointError
from moed.backends.cpu import packed_writer
from moed.backends.cpu.packed import MATRICES, PackedExperts, buffer_specs, layer_format, pack_expert_into
from moed.backends.cpu.packed_file import MappedStore, cache_dir, cache_path, source_key
from moed.backends.cpu.packed_writer import Section

__all__ = ["ExpertStore", "MappedStore", "cache_dir", "open_or_build", "pack_model", "source_key",
           "store_path", "torch_expert_layers", "verify_model"]


def store_path(model_dir):
    return cache_path(model_dir, ".moex")


class ExpertStore(MappedStore):
    """A mapped store: `layer(i)` -> PackedExperts whose buffers view the file."""
    MAGIC, KIND = b"MOEDXPK\0", "expert store"

    def __init__(self, path, mm, header):
        super().__init__(path, mm, header)
        self.layers = {int(L["index"]): L for L in header["sections"]}

    def layer(self, index):
        L = self.layers[index]
        return PackedExperts(L["fmt"], L["E"], L["H"], L["I"], self.tensors(L["name"]))


def expert_sections(moe_layers):
    """[(layer index, TorchExperts)] -> one Section a layer, one part an expert."""
    sections = []
    for index, experts in moe_layers:
        I, H = experts.gate[0].shape
        fmt = layer_format([(w, f"layers.{index}.experts.{e}") for ws in
                            (experts.gate, experts.up, experts.down) for e, w in enumerate(ws)],
                           f"layer {index}")
        E = experts.num_experts
        parts = [partial(_pack_expert, experts, index, e) for e in range(E)]
        sections.append(Section(f"layer {index}", {"index": index, "fmt": fmt, "E": E, "H": H, "I": I},
                                buffer_specs(fmt, E, H, I), parts))
    return sections


def _pack_expert(experts, index, e, rows):
    """Expert e into `rows`, its row (the first and only) of each buffer."""
    prefix = f"model.layers.{index}.mlp.experts.{e}"
    pack_expert_into(rows, 0, experts.gate[e], experts.up[e], experts.down[e],
                     tuple(f"{prefix}.{m}_proj.weight" for m in MATRICES))


def write_store(path, key, moe_layers, progress=False):
    """Pack [(layer index, TorchExperts)] into a new store file at `path` (atomic)."""
    return packed_writer.write_store(path, ExpertStore.MAGIC, key, expert_sections(moe_layers),
                                   _label(path, progress))


def _label(path, progress):
    return f"packing experts -> {Path(path).name}" if progress else None


def open_or_build(model_dir, moe_layers, progress=True, verify=False):
    """The store for this checkpoint's [(layer index, MoE)]: mapped if valid, (re)built
    otherwise. verify: check every byte's checksum first (reads the whole file)."""
    path = store_path(model_dir)
    sections = expert_sections([(i, m.experts) for i, m in moe_layers])
    return packed_writer.open_or_build(ExpertStore, path, source_key(model_dir), sections, verify,
                                     _label(path, progress))


def pack_model(model_dir, progress=True):
    """Build (or reuse) the expert store of a checkpoint ahead of time -> its path."""
    import torch

    from moed.model.checkpoint import Checkpoint
    from moed.model.registry import load_model
    model = load_model(Checkpoint(model_dir), torch.device("cpu"))
    return open_or_build(model_dir, torch_expert_layers(model), progress).path


def verify_model(model_dir):
    """Check the checksums of a checkpoint's stores -> [verified paths]. CheckpointError
    names a store that is missing (the expert store), stale, truncated or corrupt."""
    from moed.backends.cpu import dense_store
    key, checked = source_key(model_dir), []
    for cls, path in ((ExpertStore, store_path(model_dir)),
                      (dense_store.DenseStore, dense_store.store_path(model_dir))):
        if not path.exists():
            if cls is ExpertStore:
                raise CheckpointError(f"{path}: no expert store for {model_dir}; build it with "
                                      f"`moectl pack {model_dir}`", path=str(path))
            continue                # built at the daemon's first start, not by pack
        cls.open(path, key, verify=True)
        checked.append(path)
    return checked


def torch_expert_layers(model):
    """[(layer index, MoE)] of a built model, each still on the checkpoint's TorchExperts."""
    from moed.model.moe import TorchExperts
    layers = model.moe_layers()
    for i, moe in layers:
        if not isinstance(moe.experts, TorchExperts):
            raise CheckpointError(f"layer {i}: experts are {type(moe.experts).__name__}, "
                                  "expected the checkpoint's TorchExperts")
    return layers


_torch_layers = torch_expert_layers
