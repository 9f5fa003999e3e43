"""The main job end to end on the real bundled model (small settings)."""

import json

import pytest

from steerscale.demo import run_demo


@pytest.mark.integration
def test_demo_writes_report_and_steering_moves_toward_formal(tmp_path):
    res = run_demo("smollm2-135m-instruct", tmp_path, scales=(-1.0, 0.0, 1.0), gen_scales=(1.0,), n_test=6,
                   max_new_tokens=6, scaling_problems=2, log=lambda *a: None)
    for name in ("report.md", "effect_vs_scale.png", "sweep.png", "scaling.png", "results.json", "formal.safetensors"):
        assert (tmp_path / name).exists(), name
    margins = [r["effect"]["margin"]["mean"] for r in res["rows"]]
    assert margins[0] < margins[1] < margins[2]  # casual < unsteered < formal
    kl = [r["cost"]["kl"]["mean"] for r in res["rows"]]
    assert kl[1] == pytest.approx(0.0, abs=1e-6) and kl[0] > 0 and kl[2] > 0
    assert json.loads((tmp_path / "results.json").read_text())["layer"] == res["layer"]
    # the prompting baseline: the instruction alone, and with the strongest steering, on the same held-out pairs
    prompted = {r["scale"]: r["effect"]["margin"]["mean"] for r in res["prompted"]}
    assert set(prompted) == {0.0, 1.0} and prompted[0.0] != margins[1]  # the system prompt changed the context
    assert 'prompt only: system "Be formal."' in (tmp_path / "report.md").read_text()
    scaling = {r["strategy"]: r for r in res["scaling"]}
    assert set(scaling) == {"greedy", "majority", "particle_filter"}
    assert scaling["greedy"]["tokens_per_problem"] < scaling["particle_filter"]["tokens_per_problem"]  # 4 particles
    assert scaling["greedy"]["gain_vs_greedy"] is None
    gain = scaling["majority"]["gain_vs_greedy"]  # paired: the same problems, accuracy minus greedy's
    assert gain["n"] == 2 and gain["diff"] == pytest.approx(scaling["majority"]["accuracy"]["mean"]
                                                            - scaling["greedy"]["accuracy"]["mean"])
    assert "gain vs greedy" in (tmp_path / "report.md").read_text()


def test_demo_scaling_problems_are_seeded_three_number_sums_in_a_3_shot_prompt():
    from steerscale.measure.tasks.arith import three_number_sums

    problems = three_number_sums(30, seed=0)
    assert problems == three_number_sums(30, seed=0) and problems != three_number_sums(30, seed=1)
    for p in problems:
        a, op1, b, op2, c = p.expression.split()
        assert {op1, op2} <= {"+", "-"} and all(0 <= int(x) <= 9 for x in (a, b, c))
        assert int(p.answer) == int(a) + int(op1 + b) + int(op2 + c)
        assert len(p.examples) == 3 and not set(p.examples) & {q.expression for q in problems}
    q = problems[0].question  # plain text for a raw completion: three worked examples, then the problem's line
    assert q.count("Question: Calculate") == 4 and q.endswith(f"Question: Calculate {problems[0].expression}.\n")
