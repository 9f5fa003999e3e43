"""GGUF control vectors: export and import the format llama.cpp (``--control-vector``) and repeng read.

File layout
-----------
* ``general.architecture = "controlvector"``;
* ``controlvector.model_hint`` (string: the model family, e.g. ``llama``) and ``controlvector.layer_count``
  (uint32: the number of direction tensors), the two keys repeng and llama.cpp's ``cvector-generator`` write;
* one 1-D F32 tensor ``direction.N`` of ``n_embd`` floats per steered layer.

llama.cpp reads nothing but the tensors. We add ``steerscale.*`` string keys (format, method, model name,
model fingerprint, JSON metadata, the scale folded in) so our own round trip loses nothing; a file from a peer
without them imports fine, with an empty model fingerprint.

Layer convention (verified against llama.cpp's source, not assumed)
-------------------------------------------------------------------
``common_control_vector_load_one`` (common/common.cpp) rejects ``direction.0`` and writes ``direction.N`` to
offset ``n_embd * (N - 1)`` of a flat buffer; ``llama_adapter_cvec::apply`` (src/llama-adapter.cpp) fills its
per-layer tensor ``tensors[il]`` from offset ``n_embd * (il - 1)`` for ``il = 1 .. n_layer - 1`` (``tensors[0]``
is always null); each model graph calls ``build_cvec(cur, il)`` right after block ``il``'s FFN residual add
(the tensor it names ``l_out``), with ``il`` the 0-based block index. The two ``- 1`` cancel, so::

    direction.N  ==  added to the output of 0-based block N  ==  our Site(N, "resid_post")

for ``N = 1 .. n_layers - 1``. The output of block 0 cannot be steered by llama.cpp (there is no
``direction.0``). repeng agrees: it reads ``hidden_states[layer + 1]`` (the output of block ``layer``) and names
the tensor ``direction.{layer}``.

Our ``resid_pre`` of block ``i`` is the same tensor as ``resid_post`` of block ``i - 1``, so it exports as
``direction.(i-1)`` (for ``i >= 2``); on import it comes back as ``resid_post`` of ``i - 1``, the same edit at
the same place. Per-head (``head_out``), ``attn_out``, ``mlp_out`` and router sites have no control-vector form:
export refuses them and points to ``steerscale bake``.

Scale: llama.cpp multiplies each file by the strength given on its command line. We fold our scale into the
tensors (``export_gguf(..., scale=S)`` writes ``S * direction``), so strength 1 in llama.cpp reproduces
``--steer V:S`` here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..engine.ops import check_scale
from ..errors import SteerscaleError
from ..models.sites import Site, SiteKind
from ..version import __version__
from .vector import SteeringVector, json_default, register_reader

log = logging.getLogger(__name__)

ARCH = "controlvector"
FORMAT = "steerscale.gguf/1"
_KEYS = {
    "format": "steerscale.format",
    "method": "steerscale.method",
    "model_name": "steerscale.model_name",
    "model_fingerprint": "steerscale.model_fingerprint",
    "metadata": "steerscale.metadata",
    "scale": "steerscale.scale",
    "version": "steerscale.version",
}


def gguf_layer(site: Site) -> int:
    """The ``N`` of the ``direction.N`` that performs the edit at ``site``; raises when there is none."""
    if site.kind is SiteKind.RESID_POST:
        n = site.layer
    elif site.kind is SiteKind.RESID_PRE:
        n = site.layer - 1
    else:
        what = "per-head (ITI, LoFiT) vectors" if site.kind is SiteKind.HEAD_OUT else f"{site.kind.value} sites"
        raise SteerscaleError(
            f"cannot export {site.key()} to GGUF: llama.cpp control vectors only add to the residual stream at a "
            f"block's output, so {what} cannot be expressed",
            "bake the edit into a checkpoint instead: steerscale bake -m MODEL --steer VEC:SCALE -o DIR",
        )
    if n < 1:
        raise SteerscaleError(
            f"cannot export {site.key()} to GGUF: it edits the output of block 0, and llama.cpp never steers block 0 "
            "(there is no direction.0; direction.N edits the output of 0-based block N)",
            "pass drop_layer0=True (CLI: --drop-layer0) to export the other layers, or bake the vector with "
            "steerscale bake",
        )
    return n


def export_gguf(vector: SteeringVector, path: str | Path, scale: float = 1.0, *, model_hint: str | None = None,
                drop_layer0: bool = False) -> Path:
    """Write ``scale * vector`` as a llama.cpp control vector; returns the path written.

    ``model_hint`` defaults to the model family recorded in the vector's metadata (``architecture``), else its
    model name. ``drop_layer0`` skips edits of block 0's output (which llama.cpp cannot apply) instead of failing.
    """
    if not isinstance(vector, SteeringVector):
        raise SteerscaleError(f"export_gguf needs a SteeringVector, got {type(vector).__name__}")
    factor = float(check_scale(scale))
    if vector.preserve_norm:
        raise SteerscaleError(f"cannot export a norm-preserving {vector.method} vector as a GGUF control vector: "
                              "llama.cpp adds the direction but cannot rescale each activation to its original norm",
                              "steer with it in steerscale (generate, serve, eval), or export a plain vector (caa)")
    path = Path(path)
    if path.suffix != ".gguf":
        path = path.with_name(path.name + ".gguf")
    directions: dict[int, torch.Tensor] = {}
    dropped = []
    for site, vec in vector.directions.items():
        if drop_layer0 and site.kind in (SiteKind.RESID_POST, SiteKind.RESID_PRE) and gguf_layer_or_none(site) is None:
            dropped.append(site.key())
            continue
        n = gguf_layer(site)
        if n in directions and directions[n].shape != vec.shape:
            raise SteerscaleError(f"sizes differ at direction.{n} ({directions[n].shape[0]} vs {vec.shape[0]})")
        directions[n] = directions[n] + vec if n in directions else vec.clone()
    if not directions:
        raise SteerscaleError("nothing to export: the vector has no site that a GGUF control vector can express",
                              "steer resid_post of blocks 1 and up, or bake the vector with steerscale bake")
    if dropped:
        log.warning("GGUF export: dropped %s (llama.cpp cannot steer block 0's output)", ", ".join(dropped))
    sizes = {v.shape[0] for v in directions.values()}
    if len(sizes) != 1:
        raise SteerscaleError(f"directions have different sizes {sorted(sizes)}", "a control vector has one hidden size")

    hint = model_hint or vector.metadata.get("architecture") or vector.metadata.get("model_type") or vector.model_name
    metadata = dict(vector.metadata)
    if dropped:
        metadata["gguf_dropped_sites"] = dropped
    path.parent.mkdir(parents=True, exist_ok=True)
    import gguf

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".gguf")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", str(hint or "unknown"))
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        writer.add_string(_KEYS["format"], FORMAT)
        writer.add_string(_KEYS["version"], __version__)
        writer.add_string(_KEYS["method"], vector.method)
        writer.add_string(_KEYS["model_name"], vector.model_name)
        writer.add_string(_KEYS["model_fingerprint"], vector.model_fingerprint)
        writer.add_string(_KEYS["metadata"], json.dumps(metadata, default=json_default))
        writer.add_float32(_KEYS["scale"], factor)
        for n in sorted(directions):
            data = (directions[n].double() * factor).float().numpy().astype(np.float32)
            writer.add_tensor(f"direction.{n}", np.ascontiguousarray(data))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def gguf_layer_or_none(site: Site) -> int | None:
    try:
        return gguf_layer(site)
    except SteerscaleError:
        return None


def _field_value(reader, key: str):
    field = reader.get_field(key)
    if field is None or not len(field.types):
        return None
    if hasattr(field, "contents"):
        return field.contents()
    import gguf  # gguf < 0.11 has no contents(): decode the scalar by hand

    value = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def import_gguf(path: str | Path) -> SteeringVector:
    """Read a llama.cpp / repeng control vector as a ``SteeringVector`` of ``resid_post`` sites.

    ``direction.N`` becomes ``Site(N, "resid_post")`` (see the module docstring). A file written by
    ``export_gguf`` gets its method, model name, fingerprint and metadata back; any other control vector
    imports with method ``"gguf"``, its ``model_hint`` as model name and an empty fingerprint.
    """
    path = Path(path)
    reader = _open_reader(path)
    try:
        _check_architecture(reader, path)
        return _vector(reader, path, _read_directions(reader, path))
    except SteerscaleError:
        raise
    except Exception as exc:  # a damaged header can also fail lazily, while reading fields or tensor data
        raise SteerscaleError(
            f"{path} is not a readable control vector ({type(exc).__name__}: {str(exc)[:120]})",
            "the file is corrupt or truncated; re-export it",
        ) from None


def _open_reader(path: Path):
    if not path.is_file():
        raise SteerscaleError(f"GGUF file not found: {path}", "check the path")
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... for damaged files
        raise SteerscaleError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]})",
            "the file is corrupt or truncated; re-export it",
        ) from None


def _check_architecture(reader, path: Path) -> None:
    arch = _field_value(reader, "general.architecture")
    if arch != ARCH:
        raise SteerscaleError(
            f"{path} is a GGUF file but not a control vector (general.architecture is {arch!r}, expected {ARCH!r})",
            "a model GGUF goes to -m/--model; --steer and import take control vectors",
        )


def _read_directions(reader, path: Path) -> dict[Site, torch.Tensor]:
    """Every ``direction.N`` tensor as ``resid_post`` of block N, checked: F32, 1-D, one size for all, N >= 1."""
    import gguf

    directions: dict[Site, torch.Tensor] = {}
    size = None
    for t in reader.tensors:
        site = Site(_direction_index(t.name, path), SiteKind.RESID_POST)
        if int(t.tensor_type) != int(gguf.GGMLQuantizationType.F32):
            raise SteerscaleError(f"{path}: {t.name} is {gguf.GGMLQuantizationType(int(t.tensor_type)).name}, not F32",
                                  "llama.cpp only reads F32 control vectors; re-export as F32")
        shape = [int(d) for d in t.shape]
        if not shape or any(d != 1 for d in shape[1:]):
            raise SteerscaleError(f"{path}: {t.name} has shape {shape}, expected a 1-D vector")
        if size is not None and shape[0] != size:
            raise SteerscaleError(f"{path}: direction tensors have mixed sizes ({size} and {shape[0]} at {t.name})",
                                  "every direction of a control vector has the model's hidden size")
        size = shape[0]
        if site in directions:
            raise SteerscaleError(f"{path}: {t.name} appears twice")
        directions[site] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    if not directions:
        raise SteerscaleError(f"{path}: control vector has no direction tensors")
    return directions


def _direction_index(name: str, path: Path) -> int:
    """The ``N`` of a tensor named ``direction.N`` (N >= 1)."""
    prefix, _, tail = name.partition(".")
    if prefix != "direction" or not tail.isdigit():
        raise SteerscaleError(f"{path}: unexpected tensor {name!r}", "a control vector holds only direction.N tensors")
    if int(tail) == 0:
        raise SteerscaleError(
            f"{path}: has a tensor direction.0, which llama.cpp rejects (direction.N edits the output of block "
            "N, and block 0 is never steered)", "re-export the vector without layer 0")
    return int(tail)


def _text(reader, key: str) -> str:
    value = _field_value(reader, key)
    return "" if value is None else str(value)


def _vector(reader, path: Path, directions: dict[Site, torch.Tensor]) -> SteeringVector:
    """The vector, with our own header's facts when ``export_gguf`` wrote the file, else the peer's model hint."""
    hint = _text(reader, f"{ARCH}.model_hint")
    ours = _text(reader, _KEYS["format"]) == FORMAT
    metadata = _our_metadata(reader, path) if ours else {}
    metadata["gguf_source"] = str(path)
    if hint:
        metadata.setdefault("gguf_model_hint", hint)
    return SteeringVector(
        directions,
        model_name=_text(reader, _KEYS["model_name"]) if ours else hint,
        model_fingerprint=_text(reader, _KEYS["model_fingerprint"]) if ours else "",
        method=(_text(reader, _KEYS["method"]) or "gguf") if ours else "gguf",
        metadata=metadata,
    )


def _our_metadata(reader, path: Path) -> dict:
    try:
        metadata = json.loads(_text(reader, _KEYS["metadata"]) or "{}")
    except json.JSONDecodeError:
        raise SteerscaleError(f"{path}: steerscale metadata is not valid JSON", "the file is corrupt; re-export it") from None
    scale = _field_value(reader, _KEYS["scale"])
    if scale is not None and float(scale) != 1.0:
        metadata["gguf_folded_scale"] = float(scale)
    return metadata


register_reader(".gguf", import_gguf)  # SteeringVector.load reads control vectors too
