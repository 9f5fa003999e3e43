"""RL of Thoughts (scale/navigator.py): blocks, the block tree, REINFORCE training that learns a known signal, the
safetensors artifact, the ``navigator`` strategy from Python, the CLI and the server, and clear refusals. Tiny
random llama with a long context (block prompts hold the question and the work so far); one SmolLM2 run."""

import json
import math

import pytest
import torch

from steerscale import SteerscaleError
from steerscale.scale import Budget, LocalBackend, StrategySpec
from steerscale.scale.backend import Backend
from steerscale.scale.navigator import (BLOCKS, N_HAND, BlockTree, NavProblem, Navigator, State, TrainConfig,
                                        all_sequences, greedy_paths, hand_features, parse_blocks, run_block,
                                        train_navigator)


from long_context import be, lm  # noqa: E402,F401 (fixtures: a tiny llama with a long window)


def plan_reward(text: str) -> float:
    """1 when the work holds a decompose block's plan: a signal the navigator can only learn by choosing it."""
    return float("Plan:" in text)


def problems(n=3):
    return [NavProblem(f"p{i}", f"{i} + {i + 2} = ?", plan_reward) for i in range(n)]


@pytest.fixture(scope="module")
def trained(be, tmp_path_factory):
    nav, tree = train_navigator(problems(), be, max_blocks=2, block_tokens=3, epochs=60, episodes=4, explore=1,
                                lr=0.05, seed=0)
    path = nav.save(tmp_path_factory.mktemp("nav") / "nav.safetensors")
    return nav, tree, path


# -- input checks: clear errors before any model work -----------------------------------------------------------
def test_unknown_block_is_a_clear_error_everywhere():
    assert parse_blocks("reason, refine|stop") == ("reason", "refine", "stop")
    with pytest.raises(SteerscaleError, match="unknown reasoning block 'refin'; did you mean 'refine'"):
        parse_blocks("reason,refin")
    with pytest.raises(SteerscaleError, match="knob 'sequence'.*unknown reasoning block 'think'"):
        StrategySpec.of("navigator", sequence="reason,think")
    with pytest.raises(SteerscaleError, match="unknown reasoning block"):
        StrategySpec.from_json({"name": "navigator", "sequence": ["reason", 3]})
    with pytest.raises(SteerscaleError, match="must include 'stop'"):
        TrainConfig(blocks=("reason", "refine"))
    with pytest.raises(SteerscaleError, match="unknown navigator features"):
        TrainConfig(features="vibes")
    with pytest.raises(SteerscaleError, match="episodes must be an integer in 2"):
        TrainConfig(episodes=1)
    with pytest.raises(SteerscaleError, match="unknown navigator setting"):
        train_navigator(problems(), None, epoch=3)
    with pytest.raises(SteerscaleError, match="at least one training problem"):
        train_navigator([], None)


def test_the_strategy_needs_exactly_one_of_navigator_or_sequence(be, trained, tmp_path):
    with pytest.raises(SteerscaleError, match="exactly one of navigator=PATH"):
        StrategySpec.of("navigator").run("1+1?", be)
    with pytest.raises(SteerscaleError, match="exactly one of navigator=PATH"):
        StrategySpec.of("navigator", navigator=str(trained[2]), sequence="reason").run("1+1?", be)
    with pytest.raises(SteerscaleError, match="not found"):
        StrategySpec.of("navigator", navigator=str(tmp_path / "missing.safetensors"))
    with pytest.raises(SteerscaleError, match="max_blocks must be an integer in 0..16"):
        StrategySpec.of("navigator", sequence="reason", max_blocks=99).run("1+1?", be)


def test_damaged_or_foreign_files_are_refused(tmp_path, trained):
    from safetensors.torch import save_file

    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(SteerscaleError, match="cannot read navigator"):
        Navigator.load(text)
    other = tmp_path / "vector.safetensors"
    save_file({"direction": torch.zeros(4)}, str(other), metadata={"steerscale": json.dumps({"format": "x/1"})})
    with pytest.raises(SteerscaleError, match="is not a navigator"):
        Navigator.load(other)
    nav = trained[0]
    with pytest.raises(SteerscaleError, match="saved as a .safetensors file"):
        nav.save(tmp_path / "nav.pt")
    # a header that promises other shapes than its tensors: refused, not half-loaded
    from safetensors import safe_open

    with safe_open(str(trained[2]), framework="pt") as f:
        header = json.loads(f.metadata()["steerscale"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["n_hidden"] = 7
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"steerscale": json.dumps(header)})
    with pytest.raises(SteerscaleError, match="damaged"):
        Navigator.load(bad)


# -- blocks, features, the tree ---------------------------------------------------------------------------------
def test_fixed_sequence_runs_its_blocks_in_order_and_charges_the_budget(be):
    r = StrategySpec.of("navigator", sequence="decompose,reason", max_tokens=4, seed=3).run("2 + 2 = ?", be)
    assert r.info["blocks"] == ["decompose", "reason", "stop"] and r.info["mode"] == "sequence"
    assert r.best.text.startswith("Plan:") and r.best.meta["tokens"] == r.generated_tokens > 0
    assert r.budget["spent"]["verifier_passes"] == 0  # a fixed sequence reads no features
    again = StrategySpec.of("navigator", sequence="decompose,reason", max_tokens=4, seed=3).run("2 + 2 = ?", be)
    assert again.best.text == r.best.text  # seeded
    # stop ends the sequence; max_blocks cuts it
    assert StrategySpec.of("navigator", sequence="reason,stop,refine", max_tokens=3).run(
        "1?", be).info["blocks"] == ["reason", "stop"]
    assert StrategySpec.of("navigator", sequence="reason,refine,reason", max_blocks=1, max_tokens=3).run(
        "1?", be).info["blocks"] == ["reason", "stop"]


def test_a_spent_budget_stops_the_episode(be):
    r = StrategySpec.of("navigator", sequence="reason,debate,refine,reason", max_tokens=6,
                        budget="tokens=8").run("3 + 4 = ?", be)
    assert r.budget["spent"]["generated_tokens"] <= 8 and r.info["blocks"][-1] == "stop"


def test_debate_keeps_the_proposal_self_evaluation_prefers(be):
    budget = Budget()
    new = run_block("debate", "5 + 1 = ?", State(), be, budget, __import__("steerscale").scale.SamplingParams(
        max_tokens=4), seed=1)
    spent = budget.spent()
    assert new.path == ("debate",) and spent["generated_tokens"] == new.tokens and spent["verifier_passes"] == 2


def test_hand_features_have_the_documented_shape():
    s = State("Plan:\n1. add\nAnswer: 4", ("decompose", "reason"), 10, -1.0, [0.5, 0.7])
    x = hand_features(s, 0.7, 2)
    assert len(x) == N_HAND and x[0] == 0.7 and math.isclose(x[1], 0.2) and x[2] == 1.0 and x[3] == 0.0
    assert x[4] == 1.0 and x[5:10] == [1.0, 0.0, 0.0, 0.0, 0.0]  # last block: reason
    assert all_sequences(BLOCKS, 2)[:2] == [(), ("reason",)] and len(all_sequences(BLOCKS, 2)) == 1 + 4 + 16


def test_the_block_tree_caches_nodes(be):
    tree = BlockTree(problems(1), be, TrainConfig(max_blocks=2, block_tokens=3), Budget())
    first = tree.sequence_scores(("decompose",))
    spent = tree.budget.spent()
    assert first == [1.0] and tree.sequence_scores(("reason",)) == [0.0]
    again = tree.budget.spent()["generated_tokens"]
    assert tree.sequence_scores(("decompose",)) == first and tree.budget.spent()["generated_tokens"] == again
    assert spent["generated_tokens"] > 0


# -- training learns, the artifact round-trips, the strategy applies it -----------------------------------------
def test_reinforce_learns_to_choose_the_rewarded_block(trained, be):
    nav, tree, path = trained
    hist = nav.info["history"]
    assert len(hist) == 60 and hist[-1]["mean_reward"] > hist[0]["mean_reward"]
    assert hist[-1]["mean_reward"] >= 0.9
    paths = greedy_paths(nav, tree)
    assert all("decompose" in p for p in paths), paths
    # and on a problem it was not trained on, through the strategy
    r = StrategySpec.of("navigator", navigator=str(path), seed=5).run("9 + 9 = ?", be)
    assert "decompose" in r.info["blocks"] and r.best.text.count("Plan:") >= 1
    assert r.info["policy"][0]["decompose"] > 0.5 and r.budget["spent"]["verifier_passes"] >= 1


def test_the_artifact_is_safetensors_and_round_trips(trained):
    from safetensors import safe_open

    nav, _, path = trained
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["steerscale"])
        assert set(f.keys()) == {"policy.net.0.weight", "policy.net.0.bias", "policy.net.2.weight",
                                 "policy.net.2.bias"}
    assert header["format"] == "steerscale.navigator/1" and header["action_order"] == list(BLOCKS)
    loaded = Navigator.load(path)
    x = torch.randn(5, N_HAND)
    assert torch.equal(loaded.policy(x), nav.policy(x))
    assert (loaded.blocks, loaded.max_blocks, loaded.block_tokens) == (nav.blocks, 2, 3)


def test_hidden_state_navigator_reads_embed_and_is_refused_without_it(be, lm, tmp_path):
    from tiny import CharTokenizer

    nav, _ = train_navigator(problems(2), be, max_blocks=2, block_tokens=2, epochs=2, episodes=2, explore=3,
                             features="self_eval+hidden", hidden_dims=3)
    k = nav.hidden_components.shape[0]  # at most hidden_dims, and fewer than the states it was fitted on
    assert 1 <= k <= 3 and nav.n_in == N_HAND + k and nav.hidden_components.shape[1] == lm[0].config.hidden_size
    assert nav.info["hidden_states"] > k
    path = nav.save(tmp_path / "hidden.safetensors")
    r = StrategySpec.of("navigator", navigator=str(path)).run("1 + 1 = ?", be)
    assert r.budget["spent"]["verifier_passes"] >= 1

    class TextOnly(LocalBackend):  # a backend without hidden states, as an HTTP one is
        embed = Backend.embed

    text_only = TextOnly(lm[0], CharTokenizer(), lm[1], chat=False)
    with pytest.raises(SteerscaleError, match="(?s)reads the model.s hidden states.*--features self_eval"):
        StrategySpec.of("navigator", navigator=str(path)).run("1 + 1 = ?", text_only)


def test_a_text_only_navigator_runs_on_an_openai_compatible_server(lm, trained):
    pytest.importorskip("fastapi")
    from steerscale.scale.remote import OpenAIBackend
    from steerscale.serve import App, start_server
    from test_programs import call
    from tiny import ChatCharTokenizer

    path = str(trained[2])
    server = start_server(App(lm[0], ChatCharTokenizer(), lm[1], model_id="tiny", max_n=8))
    try:
        body = {"model": "tiny", "prompt": "4 + 4 = ?", "max_tokens": 3,
                "strategy": {"name": "navigator", "navigator": path, "seed": 2}}
        status, out, _ = call(server, "/v1/completions", body)
        assert status == 200, out
        info = out["steerscale"]
        assert info["strategy"] == "navigator" and info["budget"]["spent"]["generated_tokens"] > 0
        bad = dict(body, strategy={"name": "navigator", "sequence": "reason,ponder"})
        status, out, _ = call(server, "/v1/completions", bad)
        assert status == 400 and "unknown reasoning block 'ponder'" in out["error"]["message"]
        status, out, _ = call(server, "/v1/completions", dict(body, strategy={"name": "navigator",
                                                                              "navigator": "/no/such.safetensors"}))
        assert status == 400 and "not found" in out["error"]["message"]
        remote = OpenAIBackend(server.url, "tiny", chat=False)
        r = StrategySpec.of("navigator", navigator=path, seed=2, max_tokens=3).run("4 + 4 = ?", remote)
        assert r.info["blocks"][-1] == "stop" and r.budget["spent"]["generated_tokens"] > 0
    finally:
        server.close()


# -- the CLI ----------------------------------------------------------------------------------------------------
def test_cli_train_show_and_solve(lm, tmp_path, monkeypatch, capsys):
    from steerscale.cli import main
    from steerscale.commands import navigator_cmd, scale_cmds
    from tiny import CharTokenizer

    def fail(args):
        raise AssertionError("the model must not be loaded for a bad request")

    monkeypatch.setattr(navigator_cmd, "load", fail)
    out = tmp_path / "cli.safetensors"
    assert main(["navigator", "train", "--task", "gym:basic_arithmetic", "--blocks", "reason,plan,stop",
                 "-o", str(out)]) == 2
    assert "unknown reasoning block 'plan'" in capsys.readouterr().err
    assert main(["navigator", "train", "--task", "gym:basic_arithmetic", "--train", "lr=-1", "-o", str(out)]) == 2
    assert "lr must be" in capsys.readouterr().err
    assert main(["navigator", "train", "--task", "gym:basic_arithmetic", "-o", str(tmp_path / "x.pt")]) == 2
    capsys.readouterr()

    tiny = (lm[0], CharTokenizer(), lm[1])
    monkeypatch.setattr(navigator_cmd, "load", lambda args: tiny)
    monkeypatch.setattr(scale_cmds, "load", lambda args: type("LM", (), {"model": tiny[0], "tokenizer": tiny[1],
                                                                         "layout": tiny[2]})())
    assert main(["navigator", "train", "--task", "gym:basic_arithmetic", "--problems", "2", "--max-blocks", "1",
                 "--block-tokens", "2", "--epochs", "2", "--episodes", "2", "-o", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["epochs_run"] == 2 and record["problems"] == 2 and out.is_file()
    assert main(["navigator", "show", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_blocks"] == 1 and shown["task"] == "gym:basic_arithmetic"
    assert main(["solve", "-p", "1 + 2 = ?", "--strategy", "navigator", "--knob", f"navigator={out}",
                 "--no-chat", "--json"]) == 0
    solved = json.loads(capsys.readouterr().out)
    assert solved["strategy"] == "navigator" and solved["info"]["blocks"][-1] == "stop"


# -- SmolLM2 ----------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_navigator_trains_and_applies(tmp_path):
    from steerscale import load_model

    try:
        model, tok, layout = load_model("smollm2-135m-instruct")
    except SteerscaleError as exc:
        pytest.skip(str(exc))
    be = LocalBackend(model, tok, layout)
    probs = [NavProblem("a", "Calculate 2 + 3.", lambda t: float("5" in t)),
             NavProblem("b", "Calculate 4 + 1.", lambda t: float("5" in t))]
    nav, tree = train_navigator(probs, be, max_blocks=1, block_tokens=12, epochs=2, episodes=2, explore=1)
    assert len(nav.info["history"]) == 2 and nav.info["spent"]["generated_tokens"] > 0
    path = nav.save(tmp_path / "smol.safetensors")
    r = StrategySpec.of("navigator", navigator=str(path), seed=1).run("Calculate 3 + 3.", be)
    assert r.info["blocks"][-1] == "stop" and r.budget["spent"]["generated_tokens"] > 0
    assert r.best.text.strip() and r.answer == r.best.answer
