"""HF LongCat-Flash checkpoints: config.json plus model.safetensors, or shards with model.safetensors.index.json.

Tensor names are the published ones (model.layers.N.self_attn.{0,1}.*, mlps.{0,1}.*,
mlp.router.classifier.weight, mlp.router.e_score_correction_bias,
mlp.experts.E.{gate,up,down}_proj.weight, ...). A rank reads only the experts it
holds. Directories written by transformers' `save_pretrained` carry gate/up tensors
for the zero-expert slots (E >= n_routed_experts): those, and the multi-token-prediction
head (model.mtp.*), are ignored; any other unexpected, missing or misshapen tensor is a
UserError naming it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moeport.base.atomic import atomic_path, make_folder, write_text
from moeport.base.errors import UserError
from moeport.collectives.expert_layout import ExpertLayout
from moeport.model.config import LongcatConfig
from moeport.model.context import ModelContext, ProvidesModelContext
from moeport.model.generation import GenerationDefaults
from moeport.model.lm import LongcatForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_IGNORED = re.compile(r"^model\.mtp\.")


def _layout_problem(file: str) -> str | None:
    """What is wrong with `file` as a safetensors file, in words, judged from its size and header; None if nothing shows.

    The layout: an 8-byte little-endian header length N, N bytes of JSON header giving each
    tensor's data_offsets, then the tensors' data, which must end exactly where the last one does.
    """
    size = os.path.getsize(file)
    if size < 8:
        return f"truncated ({size} bytes, shorter than the 8-byte header length)"
    with open(file, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > size - 8:
            return f"truncated or corrupt (its header length says {header_size} bytes, the file has {size} in all)"
        try:
            header = json.loads(f.read(header_size))
            data_size = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "corrupt header (expected a JSON object of tensor names, dtypes, shapes and data offsets)"
    expected = 8 + header_size + data_size
    if size < expected:
        return f"truncated ({size} bytes, its header describes {expected})"
    if size > expected:
        return f"{size - expected} bytes past the {expected} its header describes"
    return None


def _open(file: str):
    """safe_open(file), or a UserError naming `file` and what is wrong with it (missing, unreadable, truncated, corrupt)."""
    try:
        return safe_open(file, "pt")
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except OSError as exc:
        raise UserError(f"{file}: cannot read it ({exc.strerror or exc})") from None
    except SafetensorError as exc:
        detail = str(exc).removeprefix("Error while deserializing header: ")
        problem = _layout_problem(file) or f"its header does not describe valid tensors ({detail})"
        raise UserError(f"{file}: not a valid safetensors file: {problem}") from None


def _index_files(path: str, index: str) -> dict[str, str]:
    """Tensor name -> file, from the index `index` of checkpoint `path`; every file it names must exist."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{index}: not a valid safetensors index ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: not a valid safetensors index (weight_map must map tensor names to file names)")
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
        if not os.path.isfile(file):
            count = sum(1 for f in files.values() if f == file)
            raise UserError(f"{file}: no such file, though {INDEX_FILE} places {count} tensors in it")
    return files


def tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> file holding it, for a checkpoint directory (a UserError if a file is missing or unreadable)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        return _index_files(path, index)
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.isfile(single):
        raise UserError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def stored_dtype(path: str) -> torch.dtype:
    """The dtype a checkpoint directory's weights are stored in: that of its lm_head (its embedding when tied)."""
    files = tensor_files(path)
    name = "lm_head.weight" if "lm_head.weight" in files else "model.embed_tokens.weight"
    if name not in files:
        raise UserError(f"{path}: holds neither lm_head.weight nor model.embed_tokens.weight")
    with _open(files[name]) as f:
        return _get_tensor(f, files[name], name).dtype


def _expected_tensors(model: LongcatForCausalLM) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor this rank's model needs."""
    c = model.config
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        if ".mlp.experts." in name:
            continue
        shapes[name] = tuple(tensor.shape)
    i, h = c.expert_ffn_hidden_size, c.hidden_size
    for layer in range(c.num_layers):
        for expert in model.experts_here:
            prefix = f"model.layers.{layer}.mlp.experts.{expert}"
            shapes[f"{prefix}.gate_proj.weight"] = (i, h)
            shapes[f"{prefix}.up_proj.weight"] = (i, h)
            shapes[f"{prefix}.down_proj.weight"] = (h, i)
    if c.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _is_known_extra(name: str, config: LongcatConfig) -> bool:
    """Tensors a checkpoint may carry that no rank needs: zero-expert gate/up slots, the MTP head."""
    if _IGNORED.match(name):
        return True
    match = _EXPERT.match(name)
    if match is None:
        return False
    layer, expert, kind = int(match.group(1)), int(match.group(2)), match.group(3)
    if layer >= config.num_layers:
        return False
    if expert < config.n_routed_experts:
        return True  # another rank's expert
    return kind in ("gate", "up") and expert < config.num_experts_total


def _get_tensor(f, file: str, name: str) -> torch.Tensor:
    """Tensor `name` of the open safetensors file `file`, or a UserError naming both."""
    try:
        return f.get_tensor(name)
    except SafetensorError as exc:
        raise UserError(f"{file}: tensor {name} cannot be read ({exc})") from None


def _read(files: dict[str, str], names: Iterable[str]) -> Iterable[tuple[str, torch.Tensor, str]]:
    """(name, tensor, file) for each of `names`, file by file; a UserError for a file that lacks one the index places there."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, group in by_file.items():
        with _open(file) as f:
            held = set(f.keys())
            absent = [name for name in group if name not in held]
            if absent:
                more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
                raise UserError(f"{file}: no tensor {absent[0]}{more}, though {INDEX_FILE} places it in this file")
            for name in group:
                yield name, _get_tensor(f, file, name), file


def load_weights(model: LongcatForCausalLM, path: str) -> None:
    """Fill `model` (built for its rank) from the checkpoint directory `path`."""
    files = tensor_files(path)
    expected = _expected_tensors(model)
    for name in files:
        if name not in expected and not _is_known_extra(name, model.config):
            raise UserError(f"{path}: unexpected tensor {name} (not in a LongCat-Flash model with this config.json)")
    missing = sorted(set(expected) - set(files))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{path}: missing tensor {missing[0]}{more}")
    params = model.state_dict()
    i = model.config.expert_ffn_hidden_size
    with torch.no_grad():
        for name, tensor, file in _read(files, expected):
            if tuple(tensor.shape) != expected[name]:
                raise UserError(
                    f"{file}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies {expected[name]}"
                )
            if not tensor.is_floating_point():
                raise UserError(f"{file}: tensor {name} has dtype {tensor.dtype}, expected a floating-point dtype")
            match = _EXPERT.match(name)
            if match is None:
                params[name].copy_(tensor)
                continue
            layer, expert, kind = int(match.group(1)), model.experts_here.index(int(match.group(2))), match.group(3)
            experts = model.model.layers[layer].mlp.experts
            if kind == "gate":
                experts.gate_up[expert, :, :i].copy_(tensor.T)
            elif kind == "up":
                experts.gate_up[expert, :, i:].copy_(tensor.T)
            else:
                experts.down[expert].copy_(tensor.T)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def checkpoint_tensors(
    model: LongcatForCausalLM, shared: bool = True, zero_expert_slots: bool = False
) -> dict[str, torch.Tensor]:
    """This rank's tensors under checkpoint names: its experts, and the shared tensors if `shared`.

    With `zero_expert_slots` (and `shared`), also zero gate/up tensors for the zero-expert
    slots, which transformers' fused expert layout needs to load the directory.
    """
    out: dict[str, torch.Tensor] = {}
    if shared:
        for name, tensor in model.state_dict().items():
            if ".mlp.experts." not in name and not (model.config.tie_word_embeddings and name == "lm_head.weight"):
                out[name] = tensor.detach().contiguous().cpu()
    i = model.config.expert_ffn_hidden_size
    for layer_index, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for local, expert in enumerate(experts.global_ids):
            prefix = f"model.layers.{layer_index}.mlp.experts.{expert}"
            out[f"{prefix}.gate_proj.weight"] = experts.gate_up[local, :, :i].T.detach().contiguous().cpu()
            out[f"{prefix}.up_proj.weight"] = experts.gate_up[local, :, i:].T.detach().contiguous().cpu()
            out[f"{prefix}.down_proj.weight"] = experts.down[local].T.detach().contiguous().cpu()
        if shared and zero_expert_slots:
            c = model.config
            for expert in range(c.n_routed_experts, c.num_experts_total):
                for kind in ("gate", "up"):
                    out[f"model.layers.{layer_index}.mlp.experts.{expert}.{kind}_proj.weight"] = torch.zeros(
                        c.expert_ffn_hidden_size, c.hidden_size, dtype=experts.gate_up.dtype
                    )
    return out


def config_json(config: LongcatConfig) -> str:
    """config.json text for `config`, readable by transformers as well as moeport."""
    data = config.to_hf_dict()
    data["head_dim"] = config.qk_rope_head_dim  # the reference sizes its rotary table by head_dim
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _save_file(tensors: dict[str, torch.Tensor], tmp: str) -> None:
    """safetensors' save_file, whose failed write (an I/O SafetensorError) is raised as the OSError it wraps."""
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
    except SafetensorError as exc:
        number = re.search(r"\(os error (\d+)\)", str(exc))
        if number is None:
            raise
        raise OSError(int(number.group(1)), os.strerror(int(number.group(1))), tmp) from exc


def save_pretrained(
    model: LongcatForCausalLM, path: str, rank: int = 0, world_size: int = 1, zero_expert_slots: bool = False
) -> None:
    """Write `model` as an HF checkpoint directory; every file is written atomically.

    `zero_expert_slots` adds the unused gate/up tensors of the zero-expert slots, as
    transformers' save_pretrained writes them, so transformers can load the directory.

    One process writes config.json and model.safetensors. Expert-parallel ranks each
    call this with their rank: each writes the shard with its experts (rank 0's also
    holds the shared tensors) and rank 0 writes config.json and the index; the caller
    must make every rank finish before the directory is used.

    A file that cannot be written is a WriteError naming it and the cause; the
    file that was at its path before is then intact.
    """
    make_folder(path)
    tensors = checkpoint_tensors(model, shared=rank == 0, zero_expert_slots=zero_expert_slots)
    if world_size == 1:
        with atomic_path(os.path.join(path, SINGLE_FILE)) as tmp:
            _save_file(tensors, tmp)
        write_text(os.path.join(path, "config.json"), config_json(model.config))
        return
    shard = f"model-{rank + 1:05d}-of-{world_size:05d}.safetensors"
    with atomic_path(os.path.join(path, shard)) as tmp:
        _save_file(tensors, tmp)
    if rank == 0:
        c = model.config
        weight_map: dict[str, str] = {name: shard for name in tensors}
        layout = ExpertLayout(c.n_routed_experts, world_size)
        for layer in range(c.num_layers):
            for expert in range(c.n_routed_experts):
                owner = f"model-{layout.owner_of(expert) + 1:05d}-of-{world_size:05d}.safetensors"
                for kind in ("gate", "up", "down"):
                    weight_map.setdefault(f"model.layers.{layer}.mlp.experts.{expert}.{kind}_proj.weight", owner)
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        write_text(os.path.join(path, INDEX_FILE), json.dumps(index, indent=2) + "\n")
        write_text(os.path.join(path, "config.json"), config_json(c))


def load_pretrained(
    path: str, runtime: ModelContext | ProvidesModelContext | None = None, dtype: torch.dtype | None = None
) -> LongcatForCausalLM:
    """A LongCat-Flash model from an HF checkpoint directory.

    Without `runtime`: one process holding every expert, on the CPU, in the
    checkpoint's float32 (or `dtype`). With a Runtime (or the ModelContext of one):
    this rank's share of the experts on its device and dtype, expert-parallel over
    its ep group.
    """
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such checkpoint directory")
    config = LongcatConfig.from_file(path)
    model = LongcatForCausalLM(config, runtime)
    load_weights(model, path)
    model.generation_defaults = GenerationDefaults.read(path)
    if runtime is not None:
        model.place(model.context.device, model.context.dtype)
    elif dtype is not None:
        model.place("cpu", dtype)
    return model.eval()
