"""LoRA adapter files: what one holds, which UNet layers it adapts, and its tensors in one canonical form.

Two file families are read, both safetensors, both converted on load to one
form (a list of ``LoraLayer``: the UNet module it adapts, in diffusers' module
names, with its down and up matrices and its alpha / rank factor):

- diffusers / PEFT: ``[unet.]<module>.lora_A[.<adapter>].weight`` and
  ``lora_B``; diffusers' older ``<module>.lora.down.weight`` / ``lora.up`` and
  attention-processor ``<attn>.processor.to_q_lora.down.weight`` forms. Alpha
  comes from per-layer ``.alpha`` tensors, the metadata (``lora_alpha``, or
  diffusers' ``lora_adapter_metadata``), else equals the rank.
- kohya (sd-scripts, A1111): ``lora_unet_<module with _ for .>.lora_down.weight``,
  ``lora_up``, ``.alpha``. The flattened name is matched against the UNet's
  own module names (``down_blocks_0_attentions_0_..._to_q`` ->
  ``down_blocks.0.attentions.0....to_q``), so any layer the UNet has is found.

Text-encoder layers (``text_encoder.``, ``lora_te_``) are listed as ignored:
diffusiond applies adapters to the UNet only. Anything else (another
container, LyCORIS LoHa/LoKr, DoRA, a file that is not safetensors) is an
``AdapterFileError`` naming the file and what is wrong with it; so is an
adapter whose layers the model does not have, or has in other shapes (made
for another base model).

The header is read without the tensors (``inspect_file``), so a directory of
adapters is listed cheaply; tensors are read when an adapter is first used.
``save_adapter`` writes the PEFT form (what ``diffusiond train-lora`` produces).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusiond.errors import AdapterFileError

SUFFIX = ".safetensors"
FORMATS = ("peft", "diffusers", "kohya")
# Metadata keys diffusiond writes and reads.
META_FORMAT = "format"
META_BASE_MODEL = "base_model"
META_RANK = "rank"
META_ALPHA = "lora_alpha"

_PEFT = re.compile(r"^(?P<prefix>base_model\.model\.|unet\.|text_encoder_?2?\.)?(?P<module>.+)\."
                   r"(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")
_DIFFUSERS = re.compile(r"^(?P<prefix>unet\.|text_encoder_?2?\.)?(?P<module>.+)\.lora\.(?P<part>down|up)\.weight$")
_PROCESSOR = re.compile(r"^(?P<prefix>unet\.)?(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
                        r"(?P<part>down|up)\.weight$")
_KOHYA = re.compile(r"^lora_(?P<net>unet|te\d?)_(?P<flat>[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT_ALPHA = re.compile(r"^(?P<prefix>unet\.)?(?P<module>.+)\.alpha$")
_UNSUPPORTED = {
    "hada_w1_a": "a LyCORIS LoHa adapter", "lokr_w1": "a LyCORIS LoKr adapter",
    "lora_magnitude_vector": "a DoRA adapter", "dora_scale": "a DoRA adapter",
}


@dataclass(frozen=True)
class LoraTarget:
    """One adapted layer as the file names it (tensors not loaded)."""

    name: str  # the module path in dots ("down_blocks.0....to_q"), or kohya's flat name
    down: str  # tensor keys in the file
    up: str
    alpha_key: str | None  # a per-layer alpha tensor, if the file has one
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    flat: bool = False  # kohya: ``name`` has "_" for "." and is matched against the model's modules

    @property
    def rank(self) -> int:
        return self.down_shape[0]


@dataclass(frozen=True)
class AdapterFile:
    """What an adapter file holds, read from its header."""

    name: str  # what requests call it: the file name without .safetensors (or its directory's name)
    path: Path
    format: str  # one of FORMATS
    targets: tuple[LoraTarget, ...]
    alpha: float | None  # the file-wide alpha (None: each layer's, else its rank)
    metadata: Mapping[str, str]
    ignored: int  # text-encoder layers, which are not applied
    size_bytes: int
    mtime_ns: int

    @property
    def rank(self) -> int:
        return max(t.rank for t in self.targets)

    @property
    def base_model(self) -> str:
        """The base model the file says it was made for ('' when it does not say)."""
        meta = self.metadata
        return meta.get(META_BASE_MODEL) or meta.get("ss_sd_model_name") or meta.get("ss_base_model_version") or ""


@dataclass
class LoraLayer:
    """One layer's low-rank update: ``weight += scale * factor * up @ down``."""

    module: str  # the UNet module (diffusers names)
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    factor: float  # alpha / rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The full-size weight update (float32) for a weight of ``shape``."""
        rank = self.down.shape[0]
        update = self.up.reshape(self.up.shape[0], rank).float() @ self.down.reshape(rank, -1).float()
        return (update * self.factor).reshape(shape)

    @property
    def size_bytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()


@dataclass
class LoadedAdapter:
    """An adapter's layers, converted and checked against one model."""

    name: str
    file: AdapterFile
    layers: list[LoraLayer] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(layer.size_bytes for layer in self.layers)


def adapter_name(path: Path) -> str:
    """What requests call the adapter in ``path``."""
    return path.parent.name if path.name == "pytorch_lora_weights.safetensors" else path.name.removesuffix(SUFFIX)


def inspect_file(path: Path, name: str | None = None) -> AdapterFile:
    """The header of ``path`` as an ``AdapterFile``; AdapterFileError naming the file if it is not one."""
    from safetensors import safe_open

    name = name or adapter_name(path)
    if path.suffix != SUFFIX:
        raise AdapterFileError(f"adapter file {path}: only {SUFFIX} files are read (diffusers/PEFT or kohya LoRA)")
    try:
        stat = path.stat()
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except AdapterFileError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise AdapterFileError(f"adapter file {path} is not a readable safetensors file: {exc}") from None
    for marker, what in _UNSUPPORTED.items():
        if any(marker in key for key in shapes):
            raise AdapterFileError(f"adapter file {path} is {what}; diffusiond reads plain LoRA "
                                   "(diffusers/PEFT or kohya format)")
    if any(_KOHYA.match(key) for key in shapes):
        fmt, targets, ignored = "kohya", *_kohya_targets(shapes)
    elif any(_PEFT.match(key) for key in shapes):
        fmt, targets, ignored = "peft", *_pair_targets(shapes, _PEFT, "lora_A", "lora_B")
    elif any(_DIFFUSERS.match(key) or _PROCESSOR.match(key) for key in shapes):
        fmt, targets, ignored = "diffusers", *_pair_targets(shapes, _DIFFUSERS, "down", "up")
    else:
        sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
        raise AdapterFileError(f"adapter file {path} is not a LoRA in the diffusers/PEFT or kohya format "
                               f"(its tensors are named like {sample})")
    if not targets:
        raise AdapterFileError(f"adapter file {path} adapts no UNet layer (only {ignored} text-encoder layers, "
                               "which diffusiond does not apply)")
    return AdapterFile(name, path, fmt, tuple(targets), _file_alpha(metadata), metadata, ignored,
                       stat.st_size, stat.st_mtime_ns)


def _file_alpha(metadata: Mapping[str, str]) -> float | None:
    if META_ALPHA in metadata:
        return float(metadata[META_ALPHA])
    packed = metadata.get("lora_adapter_metadata")  # diffusers' save_lora_weights
    if packed:
        try:
            info = json.loads(packed)
        except ValueError:
            return None
        info = info.get("unet", info) if isinstance(info, dict) else {}
        if isinstance(info, dict) and "lora_alpha" in info:
            return float(info["lora_alpha"])
    return None


def _pair_targets(shapes: Mapping[str, tuple[int, ...]], pattern: re.Pattern[str], down: str, up: str):
    parts: dict[str, dict[str, str]] = {}
    ignored: set[str] = set()
    for key in shapes:
        match = pattern.match(key)
        if match:
            module, part = match["module"], match["part"]
        else:
            match = _PROCESSOR.match(key)
            if match is None:
                continue
            proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
            module, part = f"{match['attn']}.{proj}", match["part"]
        if (match["prefix"] or "").startswith("text_encoder"):
            ignored.add(module)
            continue
        parts.setdefault(module, {})[part] = key
    targets = []
    for module, keys in sorted(parts.items()):
        if down not in keys or up not in keys:
            continue
        alpha_key = f"{keys[down].split('.lora')[0]}.alpha"
        targets.append(LoraTarget(module, keys[down], keys[up], alpha_key if alpha_key in shapes else None,
                                  shapes[keys[down]], shapes[keys[up]]))
    return targets, len(ignored)


def _kohya_targets(shapes: Mapping[str, tuple[int, ...]]):
    parts: dict[str, dict[str, str]] = {}
    ignored: set[str] = set()
    for key in shapes:
        match = _KOHYA.match(key)
        if match is None:
            continue
        if match["net"] != "unet":
            ignored.add(match["flat"])
            continue
        parts.setdefault(match["flat"], {})[match["part"].split(".")[0]] = key
    targets = [
        LoraTarget(flat, keys["lora_down"], keys["lora_up"], keys.get("alpha"), shapes[keys["lora_down"]],
                   shapes[keys["lora_up"]], flat=True)
        for flat, keys in sorted(parts.items()) if "lora_down" in keys and "lora_up" in keys
    ]
    return targets, len(ignored)


def match_modules(adapter: AdapterFile, weights: Mapping[str, tuple[int, ...]]) -> dict[LoraTarget, str]:
    """Each target's UNet module in ``weights`` (module name -> weight shape); AdapterFileError naming the
    file when a layer is missing or has another shape (an adapter for another base model)."""
    flat_names = {name.replace(".", "_"): name for name in weights}
    found: dict[LoraTarget, str] = {}
    for target in adapter.targets:
        module = flat_names.get(target.name) if target.flat else target.name
        shape = weights.get(module) if module else None
        if shape is None:
            raise AdapterFileError(
                f"adapter {adapter.name!r} ({adapter.path}) does not fit this model: it adapts layer "
                f"{target.name}, which the model's UNet does not have (made for another base model"
                f"{' ' + repr(adapter.base_model) if adapter.base_model else ''}?)")
        fan_in = 1
        for dim in shape[1:]:
            fan_in *= dim
        down_in = 1
        for dim in target.down_shape[1:]:
            down_in *= dim
        if target.up_shape[0] != shape[0] or down_in != fan_in or target.up_shape[1] != target.rank:
            raise AdapterFileError(
                f"adapter {adapter.name!r} ({adapter.path}) does not fit this model: layer {module} has weight "
                f"shape {list(shape)}, the adapter's update is {target.up_shape[0]}x{down_in} (made for another "
                f"base model{' ' + repr(adapter.base_model) if adapter.base_model else ''}?)")
        found[target] = module
    return found


def load_adapter(adapter: AdapterFile, weights: Mapping[str, tuple[int, ...]],
                 device: torch.device | str = "cpu") -> LoadedAdapter:
    """Read and convert an adapter's tensors for a UNet with ``weights`` (module name -> weight shape)."""
    from safetensors import safe_open

    modules = match_modules(adapter, weights)
    layers = []
    try:
        with safe_open(str(adapter.path), framework="pt", device="cpu") as f:
            for target, module in modules.items():
                alpha = adapter.alpha
                if target.alpha_key is not None:
                    alpha = float(f.get_tensor(target.alpha_key).float().item())
                factor = (alpha if alpha is not None else target.rank) / target.rank
                layers.append(LoraLayer(module, f.get_tensor(target.down).float().to(device),
                                        f.get_tensor(target.up).float().to(device), factor))
    except Exception as exc:
        raise AdapterFileError(f"adapter file {adapter.path} could not be read: {exc}") from None
    return LoadedAdapter(adapter.name, adapter, layers)


def save_adapter(path: Path, layers: Sequence[LoraLayer], rank: int, alpha: float,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write ``layers`` in the PEFT form (``unet.<module>.lora_A.weight`` / ``lora_B``), which diffusers'
    ``load_lora_weights`` also reads; ``metadata`` adds to the format, rank and alpha recorded."""
    from safetensors.torch import save_file

    tensors = {}
    for layer in layers:
        tensors[f"unet.{layer.module}.lora_A.weight"] = layer.down.detach().contiguous().cpu()
        tensors[f"unet.{layer.module}.lora_B.weight"] = layer.up.detach().contiguous().cpu()
    meta = {META_FORMAT: "peft", META_RANK: str(rank), META_ALPHA: repr(float(alpha)),
            "lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": alpha})}
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def scan_directory(directory: Path) -> dict[str, Path]:
    """The adapter files in ``directory`` by name: ``NAME.safetensors``, and ``NAME/`` holding one
    ``.safetensors`` file (diffusers' ``save_lora_weights`` layout). Other files are named too (as
    ``NAME.ext``), so that asking for them gives an error naming the file rather than "not found"."""
    found: dict[str, Path] = {}
    if not directory.is_dir():
        return found
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = sorted(entry.glob(f"*{SUFFIX}"))
            if len(files) == 1:
                found[entry.name] = files[0]
        elif entry.suffix == SUFFIX:
            found[entry.stem] = entry
        elif entry.suffix in (".bin", ".pt", ".ckpt", ".pth"):
            found.setdefault(entry.stem, entry)
    return found


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter with a scale, as the command line names it (``NAME:SCALE`` or ``PATH:SCALE``)."""

    name: str
    path: Path
    scale: float


MAX_SCALE = 2.0


def parse_adapter_spec(text: str, directory: Path | None) -> AdapterSpec:
    """``NAME[:SCALE]`` (an adapter in ``directory``) or ``PATH[:SCALE]`` (a file); scale 1 when omitted."""
    from diffusiond.errors import InvalidArgument, NotFound

    name, sep, scale_text = text.rpartition(":")
    if not sep or not scale_text.replace(".", "", 1).replace("-", "", 1).isdigit():
        name, scale_text = text, "1"
    try:
        scale = float(scale_text)
    except ValueError:
        raise InvalidArgument("lora", f"{text!r}: the scale after ':' is not a number") from None
    if not -MAX_SCALE <= scale <= MAX_SCALE:
        raise InvalidArgument("lora", f"{text!r}: scale must be between {-MAX_SCALE} and {MAX_SCALE}, got {scale}")
    path = Path(name)
    if path.is_file():
        return AdapterSpec(adapter_name(path), path, scale)
    known = scan_directory(directory) if directory is not None else {}
    if name not in known:
        where = f"in {directory} (adapters there: {', '.join(known) or 'none'})" if directory else "(no --lora-dir given)"
        raise NotFound(f"adapter {name!r} is neither a file nor an adapter {where}")
    return AdapterSpec(name, known[name], scale)
