"""Read a `torch.save` state dict (`pytorch_adapter.bin`, `pytorch_model_head.bin`) without running its code.

A .bin is a zip holding a pickle (`data.pkl`) and raw storages (`data/<key>`). Unpickling can call any
global the file names, so the pickle is read by an Unpickler whose `find_class` knows only what a state
dict of tensors needs -- the tensor rebuild functions, the storage types and OrderedDict -- each mapped to
a function of this module that builds a tensor from the zip's bytes. Anything else (os.system, eval, a
class of some package) is refused with a CheckpointError before it is called. The legacy (pre-zip)
format is refused too. Sizes are checked before anything is inflated: torch.save stores its entries
uncompressed, so an archive that declares more bytes than it could hold (a zip bomb: 0.5 MiB that inflates
to 512 MiB) is refused by its declared sizes, and each storage must declare exactly the bytes its record
says it holds.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None,
                    metadata=None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2, for a 1-D storage tensor: a strided view (aliases stay aliases)."""
    if hooks:
        raise CheckpointError("the .bin holds a tensor with backward hooks, which a state dict never has")
    if not isinstance(storage, torch.Tensor) or not all(isinstance(v, int) for v in (offset, *size, *stride)):
        raise CheckpointError("the .bin holds a malformed tensor record")
    need = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if need > storage.numel():
        raise CheckpointError(f"a tensor of shape {tuple(size)} reads past its storage: the .bin is corrupt")
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *extra) -> torch.Tensor:
    return data


SAFE = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
} | {("torch", name): _StorageType(dt) for name, dt in DTYPES.items()}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str, source: Path):
        super().__init__(io.BytesIO(data))
        self.zf, self.root, self.source = zf, root, source
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE:
            raise CheckpointError(f"{self.source} is not a plain state dict: its pickle refers to {module}.{name}, "
                                  "which could run code; it was not loaded. Save the weights with safetensors "
                                  "(use_safetensors=True) or from a source you trust")
        return SAFE[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.source}: unexpected persistent record {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        if key not in self.storages:
            entry = f"{self.root}/data/{key}"
            try:
                declared = self.zf.getinfo(entry).file_size
            except KeyError:
                raise CheckpointError(f"{self.source}: storage {key} is missing: the file is truncated or corrupt") \
                    from None
            want = numel * torch.empty(0, dtype=stype.dtype).element_size() if isinstance(numel, int) else -1
            if declared != want:
                raise CheckpointError(f"{self.source}: storage {key} declares {declared} bytes for {numel} values "
                                      f"of {stype.dtype}: the file is corrupt or crafted; it was not inflated")
            raw = self.zf.read(entry)
            t = torch.frombuffer(bytearray(raw), dtype=stype.dtype) if raw else torch.empty(0, dtype=stype.dtype)
            if t.numel() != numel:
                raise CheckpointError(f"{self.source}: storage {key} holds {t.numel()} values, not {numel}")
            self.storages[key] = t
        return self.storages[key]


def _check_declared_sizes(zf: zipfile.ZipFile, path: Path) -> None:
    """Refuse an archive whose entries declare more uncompressed bytes than the file could store."""
    declared, on_disk = sum(i.file_size for i in zf.infolist()), path.stat().st_size
    if declared > 2 * on_disk + (1 << 20):
        raise CheckpointError(f"{path} declares {declared / 2 ** 20:.1f} MiB of contents in a {on_disk / 2 ** 20:.1f} "
                              "MiB file (torch.save stores entries uncompressed): a compressed or crafted archive "
                              "is refused before it is inflated")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch.save'd state dict (copies that own their memory; aliases de-duplicated by value)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a zip-format torch.save file (a legacy or corrupt .bin): convert it "
                              "to safetensors with a torch you trust")
    try:
        with zipfile.ZipFile(path) as zf:
            _check_declared_sizes(zf, path)
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise CheckpointError(f"{path} has no single data.pkl: not a torch.save file")
            root = pkls[0].split("/")[0]
            order = zf.read(f"{root}/byteorder").decode().strip() if f"{root}/byteorder" in zf.namelist() else "little"
            if order != "little":
                raise CheckpointError(f"{path} was saved on a {order}-endian machine; only little-endian is read")
            obj = _Unpickler(zf.read(pkls[0]), zf, root, path).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}): the file is truncated or corrupt") \
            from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k: v.clone() for k, v in obj.items()}
