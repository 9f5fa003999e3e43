"""Artifact files: safetensors tensors plus a JSON header, never pickle; the model check every artifact runs; and
the one interface every artifact class has (``Artifact``).

Every steerscale artifact (steering vectors, CAST conditions, steering controllers, token gates) is one
``.safetensors`` file whose metadata key ``steerscale`` holds a JSON header with a ``format`` string naming the
kind and version (``steerscale.vector/1``, ``steerscale.condition/1``, ...). ``write`` and ``read`` are the only
functions that touch those files, so a damaged file, a file of another kind or a header that is not JSON gives
the same clear error for every kind.

The interface: ``obj.save(path) -> Path``, ``Cls.load(path, layout=None)`` (with ``layout``: checked against that
model) and ``obj.check(layout)`` (a ``SteerscaleError`` when it was made for a model of another shape). A new
artifact class subclasses ``SavedArtifact`` and writes only ``to_file``, ``from_file`` and ``check``.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SteerscaleError
from ..models.layout import ModelLayout


def fingerprint(layout: ModelLayout) -> str:
    """Shape facts of a model that decide whether an artifact fits it."""
    blob = json.dumps(layout.describe(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_model(what: str, model_name: str, model_fingerprint: str, layout: ModelLayout) -> None:
    """Refuse an artifact made for a model of another shape (an empty fingerprint: made by hand, not checked)."""
    if model_fingerprint and model_fingerprint != fingerprint(layout):
        raise SteerscaleError(
            f"{what} was made for model {model_name!r} (fingerprint {model_fingerprint}), which has a different "
            f"shape from this {layout.architecture} model (fingerprint {fingerprint(layout)})",
            f"make a new {what} on this model")


def check_site(what: str, layout: ModelLayout, site, size: int, fix: str) -> None:
    """Refuse an artifact whose ``site`` this model lacks or whose tensor there has another ``size``."""
    layout.locate(site)
    if layout.site_dim(site) != size:
        raise SteerscaleError(f"{what} at {site.key()} has size {size}, but this model's site has size "
                              f"{layout.site_dim(site)}", fix)


@runtime_checkable
class Artifact(Protocol):
    """What every steerscale artifact class provides (see the module docstring)."""

    def save(self, path: str | Path) -> Path: ...

    @classmethod
    def load(cls, path: str | Path, layout: ModelLayout | None = None): ...

    def check(self, layout: ModelLayout) -> None: ...


class SavedArtifact:
    """``save``/``load`` for an artifact class from its ``to_file``/``from_file`` pair: the file format string
    (``FORMAT``), what to call it in messages (``WHAT``) and how to make a new one (``REMAKE``) are class
    attributes. A field of the wrong type in a file is a ``SteerscaleError`` naming the file."""

    FORMAT: ClassVar[str]
    WHAT: ClassVar[str]
    REMAKE: ClassVar[str] = "make it again"

    def to_file(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, JSON header)`` of the file."""
        raise NotImplementedError

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], header: dict):
        raise NotImplementedError

    def check(self, layout: ModelLayout) -> None:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        return write(path, self.FORMAT, *self.to_file())

    @classmethod
    def load(cls, path: str | Path, layout: ModelLayout | None = None):
        """Read a file of this kind; with ``layout``, refuse one made for a model of another shape."""
        tensors, header = read(path, cls.FORMAT, cls.WHAT)
        with damaged(path, cls.WHAT, cls.REMAKE):
            obj = cls.from_file(tensors, header)
        if layout is not None:
            obj.check(layout)
        return obj


def json_default(obj):
    """``json.dumps(default=...)`` for metadata: tensors and numpy scalars as numbers, sets as lists, else str."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def artifact_path(path: str | Path) -> Path:
    """``path`` with a ``.safetensors`` suffix (added when missing)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    return path


def write(path: str | Path, fmt: str, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    """Save ``tensors`` and ``header`` (plus ``format``) as one safetensors file; returns the path written."""
    path = artifact_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"format": fmt, **header}, default=json_default)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"steerscale": meta})
    return path


def read(path: str | Path, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON header of an artifact of format ``fmt``; every problem is a ``SteerscaleError``."""
    path = Path(path)
    if not path.is_file():
        raise SteerscaleError(f"{what} file not found: {path}", "check the path (artifacts end in .safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("steerscale")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise SteerscaleError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:120]})",
            "the file is corrupt or of another format; re-export it",
        ) from None
    if raw is None:
        raise SteerscaleError(f"{path} has no steerscale metadata", f"it is a safetensors file but not a {what}")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        raise SteerscaleError(f"{path}: steerscale metadata is not valid JSON",
                              "the file is corrupt; re-export it") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        got = header.get("format") if isinstance(header, dict) else None
        raise SteerscaleError(f"{path}: this is a {got!r} file, not a {what} ({fmt})",
                              "pass the file to the command that reads that kind of artifact")
    return tensors, header


@contextmanager
def damaged(path: str | Path, what: str, fix: str):
    """Around building an artifact from a file's header and tensors: a field of the wrong type or value (which
    the classes' own checks or Python raise) becomes one ``SteerscaleError`` naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SteerscaleError(f"{path}: {what} file is damaged ({type(exc).__name__}: {str(exc)[:80]})", fix) from None


def format_of(path: str | Path) -> str | None:
    """The ``format`` string of a steerscale artifact file, or None when it is not one (any other file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("steerscale") or "{}").get("format")
    except Exception:
        return None
