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
    scaling = {r["strategy"]: r for r in res["scaling"]}
    assert set(scaling) == {"greedy", "majority", "particle_filter"}
    assert scaling["greedy"]["tokens_per_problem"] < res["scaling"][2]["tokens_per_problem"]  # 8 samples cost more
