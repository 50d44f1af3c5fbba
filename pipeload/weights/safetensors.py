"""Safetensors headers and Hugging Face model folders: tensor byte ranges without loading data.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping names to
dtype, shape and data offsets, then the raw data. We parse the header ourselves (it is tiny)
so that each tensor becomes a `TensorInfo` byte range, read later like any GGUF tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from .tensor_info import TensorInfo

ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one .safetensors file; raises ModelFileError if it is truncated or corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ModelFileError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{path}: corrupt safetensors header: {e}") from None
        except RecursionError:
            raise ModelFileError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(_is_int(v) for v in entry["shape"] + entry["data_offsets"])):
            raise ModelFileError(f"{path}: corrupt safetensors entry for {name!r}: {str(entry)[:200]}")
        dtype, shape, (begin, end) = entry.get("dtype"), tuple(entry["shape"]), entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
            raise ModelFileError(f"{path}: tensor {name!r} has unsupported dtype {str(dtype)[:40]!r}")
        if any(d < 0 or d > size for d in shape):  # (no dimension can exceed the file's bytes)
            raise ModelFileError(f"{path}: tensor {name!r} has impossible shape {list(shape)[:8]}")
        count = 1
        for d in shape:
            count = min(count * d, size + 1)  # past the file's size it cannot match: stop growing
        if end - begin != count * ITEM_SIZES[dtype] or begin < 0:
            raise ModelFileError(f"{path}: tensor {name!r} shape {list(shape)[:8]} does not match its byte range "
                                 f"{begin}..{end}")
        if base + end > size:
            raise ModelFileError(f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}")
        infos[name] = TensorInfo(name=name, path=path, offset=base + begin, nbytes=end - begin, shape=shape, dtype=dtype)
    return infos


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_hf_folder(folder: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """(config.json as a dict, tensor infos over all shards) of a Hugging Face model folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{folder}: not a model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except RecursionError:
        raise ModelFileError(f"{config_path}: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{config_path}: not valid JSON: {e}") from None
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
            raise ModelFileError(f"{index_path}: corrupt shard index: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelFileError(f"{index_path}: corrupt shard index: weight_map must map tensor names to file names")
        shards = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if not found:
            bins = sorted(p.name for p in folder.glob("*.bin"))
            hint = f" (found {', '.join(bins)}: convert PyTorch .bin checkpoints to safetensors first)" if bins else ""
            raise ModelFileError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
        shards = found
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.is_file():
            raise ModelFileError(f"{folder}: shard {shard} listed in the index is missing")
        tensors.update(read_safetensors_header(shard_path))
    return config, tensors
