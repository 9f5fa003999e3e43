"""``steerscale calibrate`` on a tiny random llama: the recommendation respects the KL budget, a vector without an
effect gets no strength, a looping setting is passed over, runs resume, the written vector is the chosen setting,
and bad input is a clear error."""

import json

import pytest
import torch

from steerscale.cli import build_parser, main
from steerscale.engine.generation import generate
from steerscale.errors import SteerscaleError
from steerscale.measure.calibrate import calibrate, calibrate_set, choose, pareto_front, repetition, split_pairs
from steerscale.measure.judges import parse_judge
from steerscale.steer.conditional import fit_condition
from steerscale.steer.bake import bake
from steerscale.steer.extract import extract
from steerscale.steer.pairs import load_pairs
from steerscale.steer.vector import SteeringVector
from tiny import tiny_lm

# every command module imported now, before a test patches commands.common.load: a module first imported while it is
# patched would keep the stand-in (``from .common import load``) for the rest of the session
build_parser()

PAIRS = [{"prompt": f"Q{i}: tell me", "positive": "AAAA BBBB AAAA" + "A" * (i % 3),
          "negative": "zzzz yyyy zzzz" + "z" * (i % 4)} for i in range(16)]
QUIET = dict(progress=False, log=lambda *a: None, n_neutral=4)


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_lm("llama")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toward(lm):
    """A vector that raises the positive replies' margin on the tiny model: on its random weights the CAA mean
    difference at layer 1 lowers it (measured: -0.11 at x1), so its negation raises it."""
    return extract(lm, PAIRS, "caa", [1], read="mean", progress=False) * -8


def row(label, gain, lo, hi, kl_mean, kl_hi, broken=False):
    return {"label": label, "layer": 1, "scale": 1.0, "gain": {"diff": gain, "lo": lo, "hi": hi},
            "kl": {"mean": kl_mean, "lo": 0.0, "hi": kl_hi}, "broken": broken}


def test_choose_takes_the_largest_effect_within_the_budget_and_says_why_when_none():
    rows = [row("a", 0.2, 0.1, 0.3, 0.1, 0.2), row("b", 0.5, 0.3, 0.7, 0.4, 0.6), row("c", 0.9, 0.5, 1.2, 2, 3, True)]
    best, why = choose(rows, max_kl=0.5)
    assert best["label"] == "a" and "<= --max-kl 0.5" in why  # b's KL upper bound 0.6 is over the budget
    assert choose(rows, max_kl=0.7)[0]["label"] == "b"
    none, why = choose([row("z", 0.05, -0.1, 0.2, 0.1, 0.1)], max_kl=1)
    assert none is None and "no setting has an effect" in why
    none, why = choose(rows, max_kl=0.1)
    assert none is None and "costs more than --max-kl" in why and "a," in why
    assert [r["label"] for r in pareto_front(rows)] == ["a", "b", "c"]
    assert [r["label"] for r in pareto_front(rows + [row("d", 0.1, 0, 0.2, 0.2, 0.3)])] == ["a", "b", "c"]


def test_repetition_and_split():
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition([7] * 10) == pytest.approx(7 / 8)
    pairs = load_pairs(PAIRS)
    train, select, test = split_pairs(pairs, fit=True, seed=0)
    assert (len(train), len(select), len(test)) == (8, 4, 4)
    assert not {p.positive + str(p.prompt) for p in train} & {p.positive + str(p.prompt) for p in select + test}


def test_the_recommendation_respects_max_kl_and_feeds_steer(lm, toward, tmp_path):
    cal = calibrate(lm, PAIRS, vector=toward, scales=(0.5, 1, 2, 4, 8), max_kl=0.0105, system="Be A.",
                    gen_tokens=0, out_dir=tmp_path, **QUIET)
    rec = cal.recommended
    assert rec is not None and rec["kl"]["hi"] <= 0.0105 and rec["gain"]["lo"] > 0
    # the budget bites: a stronger setting had a larger effect but an upper bound past it
    assert any(r["gain"] and r["gain"]["diff"] > rec["gain"]["diff"] and r["kl"]["hi"] > 0.0105 for r in cal.rows)
    assert any(r["stage"] == "fine" for r in cal.rows)  # refined around the best
    saved = SteeringVector.load(tmp_path / "calibrated.safetensors")
    saved.check_compatible(lm.layout)
    (site,) = toward.sites
    assert torch.allclose(saved.directions[site], toward.directions[site] * rec["scale"])
    assert saved.metadata["calibration"]["scale"] == rec["scale"]
    report = bake(lm.model, lm.layout, saved, 1.0, tmp_path / "baked", verify=True)  # steerscale bake takes it
    assert report["check"]["reload_max_abs_diff"] < 1e-4
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["steer"].endswith("calibrated.safetensors:1") and data["recommended"]["label"] == rec["label"]
    assert "prompt" in data["test"] and "recommended_minus_prompt" in data["test"]
    assert (tmp_path / "calibration.png").stat().st_size > 1000

    again = calibrate(lm, PAIRS, vector=toward, scales=(0.5, 1, 2, 4, 8), max_kl=0.0105, system="Be A.",
                      gen_tokens=0, out_dir=tmp_path, **QUIET)  # resumes: nothing measured twice
    assert again.config["resumed_measurements"] >= len(cal.rows) and again.recommended["label"] == rec["label"]


def test_a_vector_without_an_effect_gets_no_strength(lm, toward, tmp_path):
    faint = toward * 1e-9
    cal = calibrate(lm, PAIRS, vector=faint, scales=(1, 100, 10000), max_kl=1.0, gen_tokens=0, out_dir=tmp_path,
                    **QUIET)
    assert cal.recommended is None and "no setting has an effect" in cal.verdict
    assert not (tmp_path / "calibrated.safetensors").exists()
    assert json.loads((tmp_path / "calibration.json").read_text())["steer"] is None


def test_a_looping_recommendation_is_passed_over(lm, toward):
    cal = calibrate(lm, PAIRS, vector=toward, scales=(1, 8), max_kl=1.0, gen_tokens=8, max_repetition=0.5, **QUIET)
    looping = [r for r in cal.rows if r.get("repetition", 0) > 0.5]
    assert looping, "x8 makes the tiny model repeat one token (measured 0.83)"
    assert "passed over for repetitive samples" in cal.verdict or cal.recommended is None
    assert cal.recommended is None or cal.recommended["repetition"] <= 0.5


def test_pairs_mode_fits_one_direction_per_layer(lm):
    cal = calibrate(lm, PAIRS, layers="0,2", scales=(1,), max_kl=1.0, compare=[(1, 1.0)], gen_tokens=0, **QUIET)
    assert {r["layer"] for r in cal.rows} == {0, 2}
    assert cal.test["settings"][-1]["label"] == "L1 x1"  # compared on the test pairs


@pytest.mark.parametrize("argv, message", [
    (["--max-kl", "-1"], "max_kl must be a positive number"),
    (["--compare", "fourteen"], "bad --compare"),
    (["--scales", "1,-2"], "strengths must be positive"),
    (["--pairs", "no_such_set"], "no bundled pairs set"),
    (["--layers", "99"], "out of range"),
])
def test_bad_input_is_one_clear_error(monkeypatch, capsys, tmp_path, lm, argv, message):
    from steerscale.commands import common

    monkeypatch.setattr(common, "load", lambda args: lm)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in PAIRS))
    args = ["calibrate", "--pairs", str(pairs), "-o", str(tmp_path / "out"), "--gen-tokens", "0", *argv]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_the_command_line_runs_and_writes_its_files(monkeypatch, capsys, tmp_path, lm, toward):
    from steerscale.commands import common

    monkeypatch.setattr(common, "load", lambda args: lm)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in PAIRS))
    toward.save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    assert main(["calibrate", "--pairs", str(pairs), "--vector", str(tmp_path / "v.safetensors"), "--scales", "1,8",
                 "--neutral", "4", "--gen-tokens", "0", "--system", "Be A.", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verdict: vector x" in printed and "prompt       'Be A.'" in printed
    assert f"--steer {out / 'calibrated.safetensors'}:1" in printed
    assert {p.name for p in out.iterdir()} == {"calibration.json", "calibration.png", "calibrated.safetensors",
                                               "measurements.jsonl"}


# -- judges on generations, vector sets, calibration.json as a vector ---------------------------------------------
PROMPTS = [p["prompt"] for p in PAIRS]


def steered_only_words(lm, vector, scale) -> set[str]:
    """Words of the greedy replies to PROMPTS under ``vector`` x ``scale`` that no unsteered reply has (measured,
    not assumed: on the tiny model the toward vector makes it repeat one token)."""
    words = [{w for g in generate(lm.model, lm.tokenizer, lm.layout, PROMPTS, ivs, max_new_tokens=12)
              for w in g.text.split()} for ivs in ([], vector.interventions(scale))]
    return words[1] - words[0]


@pytest.mark.parametrize("kind", ["regex", "lexicon"])
def test_a_judge_on_generations_finds_the_effect_the_replies_show(lm, toward, tmp_path, kind):
    new = steered_only_words(lm, toward, 1.0)
    assert new, "x1 of the toward vector changes the tiny model's replies"
    if kind == "regex":
        spec = "regex:" + "|".join(rf"\b{w}\b" for w in sorted(new))
    else:
        (tmp_path / "words.txt").write_text("# words only steered replies use\n" + "\n".join(sorted(new)))
        spec = f"lexicon:{tmp_path / 'words.txt'}"
    cal = calibrate(lm, None, vector=toward, judge=spec, prompts=PROMPTS, judge_tokens=12, scales=(1,),
                    max_kl=10.0, gen_tokens=0, out_dir=tmp_path / "out", **QUIET)
    assert cal.config["judge"] == spec and cal.config["n_select"] == 8
    rec = cal.recommended
    assert rec is not None and rec["gain"]["lo"] > 0, cal.verdict  # the steered replies use the words, plain ones not
    assert cal.test["settings"][0]["gain"]["diff"] > 0  # and so on the held-out prompts
    # a pattern no reply can match: no effect, no strength
    none = calibrate(lm, None, vector=toward, judge=r"regex:\Aimpossible\b", prompts=PROMPTS, judge_tokens=12,
                     scales=(1,), max_kl=10.0, gen_tokens=0, **QUIET)
    assert none.recommended is None and "no setting has an effect" in none.verdict


def test_probe_and_llm_judges_score_replies(lm, tmp_path):
    cond = fit_condition(lm, ["AAAA BBBB AAAA " + "A" * i for i in range(8)],
                         ["zzzz yyyy zzzz" + "z" * i for i in range(8)], progress=False)
    cond.save(tmp_path / "cond.safetensors")
    probe = parse_judge(f"probe:{tmp_path / 'cond.safetensors'}")
    probe.check(lm)
    a, b = probe.score(lm, [], ["AAAA BBBB AAAA", "zzzz yyyy zzzz"])
    assert a > b  # the side the condition holds on reads higher
    llm = parse_judge("llm:Is this text about the letter A?")
    scores = llm.score(lm, [], ["AAAA BBBB", "zzzz yyyy", "AAAA BBBB"])
    assert all(0 < s < 1 for s in scores) and scores[0] == scores[2] != scores[1]


@pytest.mark.parametrize("spec, message", [
    ("bogus:x", "unknown judge 'bogus:x'"),
    ("regex", "unknown judge"),
    ("regex:(", "not a valid regular expression"),
    ("lexicon:/no/such/words.txt", "no file"),
    ("probe:/no/such/cond.safetensors", "no file"),
    ("llm:", "needs an argument"),
    ("llm:   ", "needs a question"),
])
def test_bad_judge_specs_are_clear_errors(spec, message):
    with pytest.raises(SteerscaleError, match=message.replace("(", r"\(")):
        parse_judge(spec)


def test_a_vector_set_gets_one_row_each_and_the_best_feeds_steer(lm, toward, tmp_path):
    from steerscale.steer.vector import load_steering

    vectors = {"toward": toward, "faint": toward * 1e-9}
    report = calibrate_set(lm, PAIRS, vectors, scales=(0.5, 1), max_kl=1.0, gen_tokens=0, out_dir=tmp_path,
                           **QUIET)
    rows = {r["name"]: r for r in report["vectors"]}
    assert rows["toward"]["recommended"] and rows["faint"]["recommended"] is None
    assert "no setting has an effect" in rows["faint"]["verdict"] and report["best"] == "toward"
    assert rows["toward"]["test_gain"]["diff"] == report["results"]["toward"].test["settings"][0]["gain"]["diff"]
    assert {p.name for p in tmp_path.iterdir()} >= {"toward", "faint", "calibration.json", "measurements.jsonl"}
    # the summary, and each vector's own calibration, load as the chosen vector (layer and strength: auto)
    best = SteeringVector.load(tmp_path / "toward" / "calibrated.safetensors")
    for path in (tmp_path / "calibration.json", tmp_path / "toward" / "calibration.json"):
        got = SteeringVector.load(path)
        assert got.sites == best.sites and all(torch.equal(got.directions[s], best.directions[s]) for s in got.sites)
    assert len(load_steering([str(tmp_path / "calibration.json")], lm.layout)) == 1
    with pytest.raises(SteerscaleError, match="recommends no setting: no setting has an effect"):
        SteeringVector.load(tmp_path / "faint" / "calibration.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(SteerscaleError, match="not a steerscale calibration"):
        SteeringVector.load(tmp_path / "other.json")


def test_generate_steers_with_a_calibration_json(monkeypatch, capsys, tmp_path, lm, toward):
    from steerscale.commands import generate_cmd

    monkeypatch.setattr(generate_cmd, "load", lambda args: lm)  # generate_cmd holds its own reference
    cal = calibrate(lm, PAIRS, vector=toward, scales=(0.5, 1), max_kl=1.0, gen_tokens=0, out_dir=tmp_path, **QUIET)
    assert cal.recommended is not None
    texts = []
    for steer in ([], ["--steer", str(tmp_path / "calibration.json")], ["--steer", f"{cal.vector_path}:1"]):
        assert main(["generate", "-p", "Q1: tell me", "--max-new-tokens", "8", "--json", *steer]) == 0
        texts.append(json.loads(capsys.readouterr().out)["text"])
    assert texts[1] == texts[2] != texts[0]


def test_the_command_line_calibrates_a_folder_of_vectors_with_a_judge(monkeypatch, capsys, tmp_path, lm, toward):
    from steerscale.commands import common

    monkeypatch.setattr(common, "load", lambda args: lm)
    (tmp_path / "vecs").mkdir()
    toward.save(tmp_path / "vecs" / "toward.safetensors")
    (toward * -1).save(tmp_path / "vecs" / "away.safetensors")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    word = sorted(steered_only_words(lm, toward, 1.0))[0]
    out = tmp_path / "out"
    assert main(["calibrate", "--vector", str(tmp_path / "vecs"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--judge", rf"regex:\b{word}\b", "--judge-tokens", "12", "--scales", "1", "--max-kl", "10",
                 "--neutral", "4", "--gen-tokens", "0", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== toward ==" in printed and "== away ==" in printed and "verdict: best: toward at vector x1" in printed
    summary = json.loads((out / "calibration.json").read_text())
    assert summary["best"] == "toward" and summary["vector_file"] == "toward/calibrated.safetensors"
    assert main(["calibrate", "--vector", str(tmp_path / "vecs"), "--judge", "regex:(", "-o", str(out)]) == 2
    assert "not a valid regular expression" in capsys.readouterr().err
    assert main(["calibrate", "--vector", str(tmp_path / "vecs"), "--judge", "regex:x", "-o", str(out)]) == 2
    assert "calibrate needs --pairs" in capsys.readouterr().err
