"""Row operations on a transformers KV cache (``DynamicCache``-like: ``cache.layers[i].keys/values`` of shape
``(batch, heads, length, head_dim)``): select, fork or drop rows, and join caches of different lengths.

Joined caches are left-padded with zero columns; the caller keeps a 2-D attention mask with 0 at those columns and
feeds position ids counted from real tokens, so the padding is invisible to the model. Used by the scaling engine
(``scale.local``: forks and merges of partial solutions) and the server's scheduler (requests joining and leaving
a running batch).
"""

from __future__ import annotations

import copy
import inspect

import torch


def map_cache(cache, fn):
    """A new cache whose every key/value tensor is ``fn(tensor)`` (the input cache is left untouched)."""
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        nl = copy.copy(layer)
        if getattr(layer, "is_initialized", True) and isinstance(getattr(layer, "keys", None), torch.Tensor):
            nl.keys, nl.values = fn(layer.keys), fn(layer.values)
        new.layers.append(nl)
    return new


def cat_caches(caches: list, widths: list[int], total: int):
    """Left-pad each cache to ``total`` columns with zeros and concatenate along the batch."""
    base = caches[0]
    new = copy.copy(base)
    new.layers = []
    for li, layer in enumerate(base.layers):
        nl = copy.copy(layer)
        ks, vs = [], []
        for c, w in zip(caches, widths):
            k, v = c.layers[li].keys, c.layers[li].values
            pad = total - w
            if pad:
                k = torch.cat([k.new_zeros(*k.shape[:2], pad, k.shape[3]), k], dim=2)
                v = torch.cat([v.new_zeros(*v.shape[:2], pad, v.shape[3]), v], dim=2)
            ks.append(k)
            vs.append(v)
        nl.keys, nl.values = torch.cat(ks), torch.cat(vs)
        new.layers.append(nl)
    return new


def with_cache(model, cache) -> dict:
    """The keyword that hands ``cache`` to ``model``'s forward: ``cache`` in transformers >= 5.20, ``past_key_values``
    before (an unknown keyword would be swallowed by ``**kwargs`` and the cache silently dropped)."""
    forward = type(model).forward
    name = _CACHE_ARG.get(forward)
    if name is None:
        name = _CACHE_ARG[forward] = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: cache}


_CACHE_ARG: dict = {}


def cache_of(out):
    """The KV cache a forward pass returned (transformers 5 names it ``cache``, earlier versions
    ``past_key_values``)."""
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values
