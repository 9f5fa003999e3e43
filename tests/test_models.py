"""Model loading and layout: every family from a tiny config; the real bundled model (integration)."""


import pytest
import torch

from steerscale import Site, SiteKind, SteerscaleError, find_layout, load_model
from steerscale.models.cache import CACHE_ENV, cache_root
from tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layout_finds_every_part(family):
    model, layout = tiny_model(family)
    assert layout.n_layers == 3
    assert layout.hidden_size == 32
    assert layout.n_heads == 4 and layout.head_dim * layout.n_heads in (32, 64)
    assert len(layout.out_projs) == len(layout.mlps) == len(layout.attentions) == 3
    assert layout.norms[0], "norms of each block are listed"
    assert layout.is_moe == (family in ("qwen2_moe", "mixtral"))
    loc = layout.locate(Site(1, SiteKind.HEAD_OUT, 3))
    assert loc.index == slice(3 * layout.head_dim, 4 * layout.head_dim)


def test_layout_names_what_it_cannot_find():
    class Unknown(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "weird"})()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(SteerscaleError, match="could not find the decoder blocks in this 'weird' model"):
        find_layout(Unknown())


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "steerscale"


def test_unknown_alias_and_empty_name():
    with pytest.raises(SteerscaleError, match="unknown model"):
        load_model("definitely-not-a-model")
    with pytest.raises(SteerscaleError, match="empty model name"):
        load_model("")


def test_local_directory_loads(tmp_path):
    model, _ = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.layout.architecture == "qwen2" and lm.tokenizer.padding_side == "left"
    m, tok, layout = lm
    assert m is lm.model and layout is lm.layout


@pytest.mark.integration
def test_bundled_smollm2_loads_from_cache_and_generates():
    lm = load_model("smollm2-135m-instruct")
    lm2 = load_model("smollm2-135m-instruct")
    assert lm2.from_cache is True
    assert lm.layout.describe() == {"architecture": "llama", "n_layers": 30, "hidden_size": 576, "n_heads": 9,
                                    "n_kv_heads": 3, "head_dim": 64, "n_experts": None}
    from steerscale import generate

    out = generate(lm.model, lm.tokenizer, lm.layout, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in out[0].text


@pytest.mark.integration
def test_smollm2_steering_cache_equivalence():
    """Greedy tokens identical and logits within 1e-4 with and without the KV cache, under steering."""
    from steerscale import Add, Intervention, TokenScope, format_prompt, generate, intervene
    from steerscale.engine.capture import tokenize

    lm = load_model("smollm2-135m-instruct")
    g = torch.Generator().manual_seed(0)
    v = torch.randn(576, generator=g)
    v = v / v.norm() * 8
    for scope in ("all", "generated", "last:3"):
        ivs = [Intervention(Site(l), Add(v, 1.0), TokenScope.parse(scope)) for l in (5, 12, 20)]
        a = generate(lm.model, lm.tokenizer, lm.layout, ["Tell me a story.", "Hi"], ivs, max_new_tokens=8, use_cache=True)
        b = generate(lm.model, lm.tokenizer, lm.layout, ["Tell me a story.", "Hi"], ivs, max_new_tokens=8, use_cache=False)
        assert [x.token_ids for x in a] == [x.token_ids for x in b], scope
    # logits: the whole sequence in one pass vs step by step with the cache
    text = format_prompt(lm.tokenizer, "Tell me a story.")
    batch = tokenize(lm.tokenizer, [text], lm.device)
    full_ids = torch.cat([batch.input_ids, torch.tensor([[504, 2626, 314]])], dim=1)
    width = batch.input_ids.shape[1]
    ivs = [Intervention(Site(10), Add(v, 1.0), TokenScope.parse("generated"))]
    with torch.no_grad(), intervene(lm.layout, ivs, prompt_width=width):
        full = lm.model(full_ids).logits
    with torch.no_grad(), intervene(lm.layout, ivs):
        out = lm.model(full_ids[:, :width], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(width, full_ids.shape[1]):
            out = lm.model(full_ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    assert torch.allclose(full, torch.cat(logits, 1), atol=1e-4)
