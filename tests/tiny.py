"""Tiny randomly initialised models of several families, built in-process from configs (no download)."""

from __future__ import annotations

import functools

import torch

from steerscale.models.layout import find_layout

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128)

FAMILIES = {
    "llama": ("LlamaConfig", dict(COMMON, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(COMMON, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(COMMON, num_key_value_heads=2, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)),
    "gemma3": ("Gemma3TextConfig", dict(COMMON, num_key_value_heads=1, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)),
    "gpt2": ("GPT2Config", dict(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=1)),
    "gpt_neox": ("GPTNeoXConfig", dict(COMMON, bos_token_id=1, eos_token_id=1)),
    "phi3": ("Phi3Config", dict(COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=1)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
    "mixtral": ("MixtralConfig", dict(COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}


@functools.lru_cache(maxsize=None)
def _build(family: str):
    import transformers

    cls_name, kwargs = FAMILIES[family]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model


def tiny_model(family: str):
    """(model, layout) for a tiny random model of ``family``; built once per test session."""
    model = _build(family)
    return model, find_layout(model)


class TinyTokenizer:
    """Enough of a tokenizer for the engine: bytes mod vocab, left padding, no chat template."""

    pad_token_id = 0
    eos_token_id = 1
    pad_token = "<pad>"
    eos_token = "<eos>"
    chat_template = None
    padding_side = "left"

    def __init__(self, vocab_size: int = 96):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [2 + (b % (self.vocab_size - 2)) for b in text.encode()]

    def __call__(self, texts, return_tensors="pt", padding=True, add_special_tokens=True):
        ids = [self.encode(t) for t in texts]
        width = max(map(len, ids))
        pad = lambda seq, fill: ([fill] * (width - len(seq)) + seq) if self.padding_side == "left" else (seq + [fill] * (width - len(seq)))
        return {
            "input_ids": torch.tensor([pad(s, self.pad_token_id) for s in ids]),
            "attention_mask": torch.tensor([pad([1] * len(s), 0) for s in ids]),
        }

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


class CharTokenizer:
    """Printable characters and newline, one token each; id 1 is EOS, 0 pad; no chat template."""

    pad_token_id, eos_token_id, pad_token, eos_token, chat_template, padding_side = 0, 1, "<pad>", "<eos>", None, "left"

    def encode(self, text):
        return [2 if ch == "\n" else 3 + min(max(ord(ch) - 32, 0), 92) for ch in text]

    def __call__(self, texts, return_tensors="pt", padding=True, add_special_tokens=True):
        ids = [self.encode(t) for t in texts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([[0] * (width - len(s)) + s for s in ids]),
                "attention_mask": torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\n" if i == 2 else chr(32 + i - 3) for i in ids if i >= 2)


class ChatCharTokenizer(CharTokenizer):
    """One character per token, plus a minimal chat template."""

    chat_template = "role: content lines"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")


def tiny_lm(family: str = "llama"):
    """A tiny random model of ``family`` with the word-level tokenizer, as ``load_model`` returns a real one."""
    from steerscale.models.loading import LoadedModel

    model, layout = tiny_model(family)
    return LoadedModel(model, TinyTokenizer(), layout, f"tiny-{family}")


def hook_count(model) -> int:
    """Forward hooks and pre-hooks on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def record_registrations(monkeypatch) -> list[str]:
    """From now until ``monkeypatch.undo()``, the class name of every module a forward (pre-)hook is registered on."""
    registered: list[str] = []
    for name in ("register_forward_hook", "register_forward_pre_hook"):
        real = getattr(torch.nn.Module, name)

        def counting(self, *args, _real=real, **kwargs):
            registered.append(type(self).__name__)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, name, counting)
    return registered
