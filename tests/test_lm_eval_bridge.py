"""lm-eval bridge: a steered model runs an lm-eval task defined on a local file, offline."""

from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_task"


@pytest.mark.integration
def test_steered_model_runs_local_lm_eval_task(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    import steerscale
    from steerscale import Site
    from steerscale.measure.lm_eval_bridge import SteeredLM
    from steerscale.steer.vector import SteeringVector

    monkeypatch.chdir(Path(__file__).parent.parent)  # the task file names its data relative to the repo root
    lm = steerscale.load_model("smollm2-135m-instruct")
    manager = TaskManager(include_path=str(TASK_DIR))
    plain = lm_eval.simple_evaluate(model=SteeredLM(lm, batch_size=8), tasks=["steerscale_tiny_mc"], task_manager=manager)
    assert len(plain["samples"]["steerscale_tiny_mc"]) == 6
    assert 0.0 <= plain["results"]["steerscale_tiny_mc"]["acc,none"] <= 1.0

    noise = SteeringVector({Site(l): torch.randn(576, generator=torch.Generator().manual_seed(l)) * 40 for l in (3, 10, 20)})
    path = noise.save(tmp_path / "noise.safetensors")
    steered = SteeredLM(lm, steer=f"{path}:1", batch_size=8)
    out = lm_eval.simple_evaluate(model=steered, tasks=["steerscale_tiny_mc"], task_manager=manager)
    # A large random edit must change the log-likelihoods lm-eval measures; afterwards the model is clean again.
    def loglik(res):
        return [float(r[0][0]) for s in res["samples"]["steerscale_tiny_mc"] for r in s["resps"]]

    assert len(loglik(out)) == 18 and max(abs(a - b) for a, b in zip(loglik(out), loglik(plain))) > 0.1
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == 0


def test_cli_run_defaults_to_auto_device():
    # lm-eval's CLI sends device="cuda:0" unless told otherwise; the bridge's entry point asks for auto instead
    from steerscale.measure.lm_eval_bridge import default_device_args

    run = ["--model", "steerscale", "--model_args", "model=smollm2-135m-instruct", "--tasks", "arc_easy"]
    assert default_device_args(run) == run + ["--device", "auto"]
    assert default_device_args(["run", *run]) == ["run", *run, "--device", "auto"]
    for kept in ([*run, "--device", "cpu"], [*run, "--device=cuda:1"], [*run, "--config", "eval.yaml"],
                 ["ls", "tasks"], ["validate", "--tasks", "arc_easy"], ["--help"], []):
        assert default_device_args(kept) == kept


def test_cuda_asked_for_without_cuda_is_one_clean_error():
    from steerscale.errors import SteerscaleError
    from steerscale.measure.lm_eval_bridge import SteeredLM

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SteerscaleError, match="no CUDA device"):
        SteeredLM(model="smollm2-135m-instruct", device="cuda:0")


@pytest.mark.integration
def test_documented_cli_command_runs_on_the_default_device(tmp_path):
    # docs/evaluation.md's command, with no --device: it crashed on a CPU machine ("Torch not compiled with CUDA")
    import subprocess
    import sys

    from steerscale import Site
    from steerscale.steer.vector import SteeringVector

    direction = torch.randn(576, generator=torch.Generator().manual_seed(0))
    vec = SteeringVector({Site(6): direction}).save(tmp_path / "v.safetensors")
    cmd = [sys.executable, "-m", "steerscale.measure.lm_eval_bridge", "--model", "steerscale",
           "--model_args", f"model=smollm2-135m-instruct,steer={vec}:1", "--tasks", "steerscale_tiny_mc",
           "--include_path", str(TASK_DIR), "--limit", "2"]
    out = subprocess.run(cmd, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "steerscale_tiny_mc" in out.stdout and "Traceback" not in out.stderr
