"""What a steering method, control or amortiser needs and writes: the record every registry entry of
``steer.methods.METHODS``, ``steer.controls.CONTROLS`` and ``steer.controls.AMORTISERS`` is.

Code that dispatches on a method (``steer.extract``, the ``extract`` command) reads these fields instead of
naming methods, so a new method is a module with its fit function plus one registry line:

* ``reads``: ``activations`` (the fit reads hidden states only: ``fit(pos, neg)`` on the ``(n, dim)`` activations
  ``steer.extract`` collected, or, for controls, its own capture pass) or ``model`` (the fit runs the model for
  gradients or training, or edits its weights: ``fit(lm, pairs, layers=, chat=, progress=, **settings)``);
* ``data``: what it is fitted on (contrastive pairs, labelled texts, two prompt sets, labelled completions, or
  steering edits to amortise);
* ``writes``: the artifact class it produces (``SteeringVector``, ``Condition``, ...; each has the
  ``steer.artifacts.Artifact`` interface) or ``"checkpoint"`` for a Hugging Face checkpoint directory;
* ``knobs``: its settings dataclass (``steer.knobs.Knobs``), read from the CLI's ``--train K=V,...``; none: it
  does not train;
* ``settings``: which of ``extract``'s own arguments (``heads``, ``seed``, ``holdout``) a model-fitting method takes;
* ``sites``: the site kind its directions live at (``resid_post``, ``head_out`` = per attention head, ``router``);
* ``preserve_norm``: its edits rescale each activation to its original norm.

Whether a llama.cpp control vector can hold what it writes (``gguf_problem``) follows from these.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Callable

from ..errors import SteerscaleError
from ..models.sites import SiteKind
from .vector import SteeringVector


class Reads(str, Enum):
    ACTIVATIONS = "activations"  # hidden states only
    MODEL = "model"  # runs the model for gradients or training, or edits its weights


class Data(str, Enum):
    PAIRS = "pairs"  # contrastive pairs: {"positive", "negative"} (with an optional "prompt")
    LABELLED = "labelled"  # labelled texts: {"text", "label": 0|1}
    PROMPT_SETS = "prompt_sets"  # a positive and a negative set of prompts
    COMPLETIONS = "completions"  # labelled completions: {"prompt", "completion", "label"}
    STEERING = "steering"  # steering edits to amortise (vectors at scales), with texts where they apply


SETTINGS = ("heads", "seed", "holdout")  # extract()'s own arguments a model-fitting method may take


@dataclass(frozen=True)
class Capability:
    """One registry entry: the function that fits it and what it needs and writes (see the module docstring)."""

    fit: Callable
    reads: Reads
    data: tuple[Data, ...]
    writes: type | str
    knobs: type | None = None
    settings: tuple[str, ...] = ()
    sites: SiteKind | None = SiteKind.RESID_POST
    preserve_norm: bool = False

    def __post_init__(self):
        object.__setattr__(self, "reads", Reads(self.reads))
        object.__setattr__(self, "data", tuple(Data(d) for d in self.data))
        if not self.data:
            raise SteerscaleError("a registry entry must say what data it is fitted on")
        unknown = set(self.settings) - set(SETTINGS)
        if unknown:
            raise SteerscaleError(f"unknown extract setting(s) {sorted(unknown)}", f"use: {', '.join(SETTINGS)}")
        if self.writes != "checkpoint" and not all(callable(getattr(self.writes, m, None))
                                                    for m in ("save", "load")):
            raise SteerscaleError(f"{self.writes!r} is not an artifact class (save/load) nor 'checkpoint'")

    @property
    def trains(self) -> bool:
        """Whether it has settings for ``--train``."""
        return self.knobs is not None

    @property
    def per_head(self) -> bool:
        return self.sites is SiteKind.HEAD_OUT

    def accepts(self, data: Data | str) -> bool:
        return Data(data) in self.data

    def knob_names(self) -> list[str]:
        return [f.name for f in fields(self.knobs)] if self.knobs else []

    def gguf_problem(self) -> tuple[str, str] | None:
        """Why a llama.cpp control vector cannot hold what this writes, and what to do instead (None: it can)."""
        if self.writes == "checkpoint":
            return ("this writes a Hugging Face checkpoint, not a vector", "convert the checkpoint with llama.cpp's "
                                                                           "convert_hf_to_gguf.py")
        if self.writes is not SteeringVector:
            return (f"it writes a {self.writes.__name__}, not a steering vector", "write .safetensors")
        if self.sites is SiteKind.HEAD_OUT:
            return ("its vectors are per attention head; a llama.cpp control vector holds only residual directions",
                    "write .safetensors and bake it (steerscale bake) for other engines")
        if self.sites is SiteKind.ROUTER:
            return ("router edits have no llama.cpp (GGUF) form", "use a .safetensors path")
        if self.preserve_norm:
            return ("its steering rescales each activation to its original norm, which a llama.cpp control vector "
                    "cannot do", "write .safetensors and steer with it in steerscale")
        if self.sites is not SiteKind.RESID_POST:
            return (f"its edits at {self.sites.value} sites are not residual directions", "write .safetensors")
        return None

    def summary(self) -> dict:
        """The capabilities as JSON-ready values (for listings and docs)."""
        writes = self.writes if isinstance(self.writes, str) else self.writes.__name__
        return {"reads": self.reads.value, "data": [d.value for d in self.data], "writes": writes,
                "train": self.knob_names(), "settings": list(self.settings),
                "sites": self.sites.value if self.sites else None, "preserve_norm": self.preserve_norm,
                "gguf": self.gguf_problem() is None}


def names_with(registry, test: Callable[[Capability], bool]) -> list[str]:
    """The names in ``registry`` whose capability passes ``test`` (for messages: "use one of ...")."""
    return [name for name, cap in registry.items() if test(cap)]


def train_knobs(registry, name: str, train: str | dict | None) -> dict:
    """The ``--train`` settings (``"epochs=3,lr=0.01"`` or a dict) of entry ``name`` as typed, validated knobs: a bad
    value or an unknown knob fails here, before any model work, and an entry without knobs refuses any."""
    cap = registry[name]
    if not train:
        return {}
    if not cap.trains:
        trainers = names_with(registry, lambda c: c.trains)
        raise SteerscaleError(f"{registry.kind} {registry.canonical(name)!r} does not train, so it takes no --train "
                              f"settings (they are the knobs of {', '.join(trainers)})",
                              f"drop --train, or use one of: {', '.join(trainers)}")
    knobs = cap.knobs.parse(train)
    cap.knobs.build(**knobs)  # checks the values as the fit will
    return knobs
