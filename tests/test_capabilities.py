"""Capabilities in the registries (issue 24 item 4): every extraction method, control and amortiser declares what
it needs and writes; extract.py and the extract command read those declarations and name no method; every
artifact class has one save/load/check interface."""

import ast
import dataclasses
import importlib
import inspect
import json
from pathlib import Path

import pytest
import torch

from steerscale import Site, SteerscaleError
from steerscale.cli import main
from steerscale.registry import Registry
from steerscale.steer import artifacts
from steerscale.steer.capabilities import Capability, Data, Reads
from steerscale.steer.knobs import Knobs
from steerscale.steer.vector import SteeringVector, fingerprint
from tiny import tiny_lm

SRC = Path(__file__).resolve().parents[1] / "src" / "steerscale"
DISPATCHERS = [(SRC / "steer" / "extract.py", "steerscale.steer"), (SRC / "commands" / "steer_cmds.py", "steerscale.commands")]
# Names kept for callers of the first release: extract()'s ``iti_heads`` parameter (and the metadata key it
# writes) and extract._iti_direction, which bench/truthfulqa_steering.py imports.
COMPAT = {"_iti_direction"}


def _registries():
    from steerscale.steer.controls import AMORTISERS, CONTROLS
    from steerscale.steer.methods import METHODS

    return {"methods": METHODS, "controls": CONTROLS, "amortisers": AMORTISERS}


def _pairs(n=12):
    return [{"positive": f"good kind lovely {i} " * 2, "negative": f"bad rude awful {i} " * 2} for i in range(n)]


def test_every_entry_declares_what_it_needs_and_writes():
    for kind, registry in _registries().items():
        assert isinstance(registry, Registry) and len(registry) >= 2, kind
        for name, cap in registry.items():
            assert isinstance(cap, Capability), (kind, name)
            assert isinstance(cap.reads, Reads) and cap.data and all(isinstance(d, Data) for d in cap.data)
            assert cap.writes == "checkpoint" or issubclass(cap.writes, artifacts.Artifact) or \
                cap.writes is SteeringVector, (kind, name, cap.writes)
            assert cap.knobs is None or (issubclass(cap.knobs, Knobs) and dataclasses.is_dataclass(cap.knobs))
            params = inspect.signature(cap.fit).parameters
            if kind == "methods" and cap.reads is Reads.ACTIVATIONS:
                assert list(params)[:2] == ["pos", "neg"], name  # fit(pos, neg) on collected activations
            elif kind == "methods":  # fit(lm, pairs, layers=, chat=, progress=, **settings and knobs)
                assert {"layers", "chat", "progress"} <= set(params), name
                takes_knobs = any(p.kind is p.VAR_KEYWORD for p in params.values())
                assert all(s in params or (takes_knobs and s in cap.knob_names()) for s in cap.settings), name
            assert json.dumps(cap.summary())
    from steerscale.steer.methods import METHODS

    caps = {n: c.summary() for n, c in METHODS.items()}
    assert caps["caa"]["data"] == ["pairs", "labelled"] and caps["pca_diff"]["data"] == ["pairs"]
    assert caps["iti"]["sites"] == "head_out" and not caps["iti"]["gguf"] and caps["caa"]["gguf"]
    assert caps["lofit"]["reads"] == "model" and "epochs" in caps["lofit"]["train"]
    assert caps["grains"]["preserve_norm"] and not caps["grains"]["gguf"]
    with pytest.raises(SteerscaleError, match="what data"):
        Capability(lambda pos, neg: None, Reads.ACTIVATIONS, (), SteeringVector)
    with pytest.raises(SteerscaleError, match="not an artifact class"):
        Capability(lambda pos, neg: None, Reads.ACTIVATIONS, (Data.PAIRS,), dict)


def _named_methods(source: str, package: str, names: set[str], fitters: list) -> list[str]:
    """Method names a dispatcher's source holds: string literals equal to a registered name or alias, and imports
    of a method's own fit function or knobs class (other than the compatibility re-export)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names:
            found.append(f"line {node.lineno}: {node.value!r}")
        if isinstance(node, ast.ImportFrom) and node.level and node.module:
            module = importlib.import_module("." * node.level + node.module, package)
            for alias in node.names:
                obj = getattr(module, alias.name, None)
                if any(obj is f for f in fitters) and (alias.asname or alias.name) not in COMPAT:
                    found.append(f"line {node.lineno}: imports {alias.name} from {node.module}")
    return found


def test_extract_and_the_cli_name_no_method():
    from steerscale.steer.methods import METHODS

    names = set(METHODS) | set(METHODS.aliases)
    fitters = [cap.fit for cap in METHODS.values()] + [cap.knobs for cap in METHODS.values() if cap.knobs]
    for path, package in DISPATCHERS:
        assert _named_methods(path.read_text(), package, names, fitters) == [], path.name
    # the check finds what the old code held
    old = 'if args.method in ("lofit", "grains"):\n    pass\nfrom .lofit import LofitConfig, fit_lofit\n'
    assert len(_named_methods(old, "steerscale.steer", names, fitters)) == 4


def test_every_artifact_class_has_one_save_load_check_interface(tmp_path):
    from steerscale.steer.conditional import Condition
    from steerscale.steer.controller import SteeringController
    from steerscale.steer.gating import FittedTokenGate, check_gate, load_gate, save_gate

    for cls in (Condition, SteeringController, FittedTokenGate):
        assert issubclass(cls, artifacts.SavedArtifact) and issubclass(cls, artifacts.Artifact), cls
        assert cls.FORMAT.startswith("steerscale.") and cls.WHAT
    lm, other = tiny_lm("llama"), tiny_lm("qwen2")
    dim = lm.layout.site_dim(Site(1))
    gate = FittedTokenGate(Site(1), torch.ones(dim), 0.1, 0.5,
                           metadata={"model_name": lm.name, "model_fingerprint": fingerprint(lm.layout)})
    back = FittedTokenGate.load(gate.save(tmp_path / "g"), lm.layout)
    assert torch.equal(back.weight, gate.weight) and back.threshold == 0.5
    with pytest.raises(SteerscaleError, match="different shape"):
        FittedTokenGate.load(tmp_path / "g.safetensors", other.layout)
    with pytest.raises(SteerscaleError, match="not a token gate"):
        FittedTokenGate.load(SteeringVector({Site(1): torch.ones(dim)}).save(tmp_path / "v"))
    # the first release's function names still work, also on a plain engine TokenGate
    from steerscale.engine.token_gates import TokenGate

    plain = TokenGate(Site(1), torch.ones(dim), 0.1, 0.5)
    assert isinstance(load_gate(save_gate(plain, tmp_path / "p"), lm.layout), FittedTokenGate)
    check_gate(plain, lm.layout)
    with pytest.raises(SteerscaleError, match="size"):
        check_gate(TokenGate(Site(1), torch.ones(dim + 1)), lm.layout)


def test_the_steering_vector_has_the_artifact_interface():
    assert issubclass(SteeringVector, artifacts.Artifact) and hasattr(SteeringVector, "check")


def _with_method(monkeypatch, name: str, cap: Capability):
    """A copy of METHODS with one more entry, where extract and the CLI look it up: one registry line."""
    import steerscale.steer.extract as extract_mod
    import steerscale.steer.methods as methods_mod

    reg = Registry("steering method")
    old = methods_mod.METHODS
    for n, c in old.items():
        reg.add(n, c, old.description(n), tuple(a for a, target in old.aliases.items() if target == n))
    reg.add(name, cap, "a method added by a test")
    monkeypatch.setattr(methods_mod, "METHODS", reg)
    monkeypatch.setattr(extract_mod, "METHODS", reg)
    return reg


def _median_diff(pos, neg):
    d = pos.median(0).values - neg.median(0).values
    return d, {"median_diff_norm": float(d.norm())}


@dataclasses.dataclass(frozen=True)
class _ShiftConfig(Knobs):
    LABEL = "shift"
    size: float = 1.0
    seed: int = 0


def _shift_fit(lm, pairs, layers="auto", chat=None, progress=True, **knobs):
    cfg = _ShiftConfig.build(**knobs)
    site = Site(0 if layers == "auto" else int(str(layers).split("-")[0]))
    return SteeringVector({site: torch.full((lm.layout.site_dim(site),), cfg.size)}, lm.name,
                          fingerprint(lm.layout), "shift", {"preserve_norm": True, "seed": cfg.seed})


def test_a_new_method_is_one_function_and_one_registry_line(tmp_path, monkeypatch, capsys):
    import steerscale.commands.steer_cmds as steer_cmds
    from steerscale.steer.extract import extract, extract_labelled

    lm = tiny_lm()
    _with_method(monkeypatch, "median_diff", Capability(_median_diff, Reads.ACTIVATIONS, (Data.PAIRS,),
                                                         SteeringVector))
    reg = _with_method(monkeypatch, "shift", Capability(_shift_fit, Reads.MODEL, (Data.PAIRS,), SteeringVector,
                                                        knobs=_ShiftConfig, settings=("seed",), preserve_norm=True))
    assert {"median_diff", "shift"} <= set(reg)
    v = extract(lm, _pairs(), "median_diff", "1", progress=False)
    assert v.method == "median_diff" and v.sites == [Site(1)] and "median_diff_norm" in v.metadata["per_site"]["resid_post.1"]
    s = extract(lm, _pairs(), "shift", "2", seed=7, train="size=0.5", progress=False)
    assert s.sites == [Site(2)] and float(s.directions[Site(2)][0]) == 0.5 and s.metadata["seed"] == 7
    with pytest.raises(SteerscaleError, match="needs contrastive pairs"):
        extract_labelled(lm, [("good", 1)] * 3 + [("bad", 0)] * 3, "median_diff", "1", progress=False)
    with pytest.raises(SteerscaleError, match="does not train"):
        extract(lm, _pairs(), "median_diff", "1", train="size=2", progress=False)

    loads = []
    monkeypatch.setattr(steer_cmds, "load", lambda args: loads.append(1) or lm)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in _pairs()))
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("good kind", 1)] * 4
                                  + [("bad rude", 0)] * 4))
    out = tmp_path / "v.safetensors"
    assert main(["extract", "--pairs", str(pairs), "--method", "shift", "--layers", "1", "--train", "size=2",
                 "-o", str(out)]) == 0
    assert SteeringVector.load(out).directions[Site(1)][0] == 2.0 and len(loads) == 1
    refusals = [(["--pairs", str(pairs), "--method", "shift", "--train", "width=2"], "bad shift setting"),
                (["--pairs", str(pairs), "--method", "median_diff", "--train", "size=2"], "does not train"),
                (["--labelled", str(labelled), "--method", "shift"], "needs contrastive pairs"),
                (["--labelled", str(labelled), "--method", "pca"], "needs contrastive pairs"),
                (["--pairs", str(pairs), "--method", "shift", "-o", str(tmp_path / "v.gguf")], "original norm"),
                (["--pairs", str(pairs), "--method", "iti", "-o", str(tmp_path / "v.gguf")], "per attention head")]
    for extra, message in refusals:
        argv = ["extract", *extra] + ([] if "-o" in extra else ["-o", str(out)])
        assert main(argv) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert len(loads) == 1  # every refusal came before the model loaded
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    help_text = capsys.readouterr().out
    assert "median_diff" in help_text and "size, seed" in help_text  # listed from the registry, knobs included


def test_sweep_command_reads_probes_without_naming_a_method(tmp_path, monkeypatch, capsys):
    import steerscale.commands.steer_cmds as steer_cmds
    from steerscale.steer.extract import probe_sweep

    lm = tiny_lm()
    monkeypatch.setattr(steer_cmds, "load", lambda args: lm)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in _pairs()))
    assert main(["sweep", "--pairs", str(pairs), "-o", str(tmp_path / "layers")]) == 0
    out = json.loads(capsys.readouterr().out)
    table = json.loads((tmp_path / "layers" / "sweep.json").read_text())
    assert len(table) == lm.layout.n_layers and len(out["chosen"]) == 1 and (tmp_path / "layers" / "sweep.png").exists()
    heads = probe_sweep(lm, pairs=_pairs(), per_head=True, heads=3, progress=False)
    assert len(heads.accuracy) == lm.layout.n_layers * lm.layout.n_heads and len(heads.chosen) == 3
    with pytest.raises(SteerscaleError, match="one of them"):
        probe_sweep(lm, progress=False)
