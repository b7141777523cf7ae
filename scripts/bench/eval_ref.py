#!/usr/bin/env python3
"""The reference side of `emt bench eval`: greedy generation with the same LLaVA-style model written in plain
PyTorch eager (the model of train_ref.py), driven by emt over stdin/stdout so that both sides are timed in turns.

emt writes a JSON spec (model shapes, the prompt batch's raw files, new tokens, use_cache) and starts it as
  eval_ref.py SPEC.json
then sends lines "run N"; each answer is one line "ok MS_1 ... MS_N" (milliseconds per generation of the whole
batch), "peak" answers "peak MIB" (this process's peak RSS); "quit" ends. Weights are random: the figures are speed.
The computation mirrors emt's generate(): the image features replace the image token, the prompt is one forward
pass, then one forward per new token; with use_cache the keys and values of earlier positions are kept (appended
per step, as eager PyTorch code does), without it the whole sequence is recomputed every step. No row stops early.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_ref  # noqa: E402  (the model classes and the pipe protocol)


def rope(model, positions):
    inv = 1.0 / (model.theta ** (torch.arange(0, model.hd, 2, dtype=torch.float32) / model.hd))
    ang = positions.float().unsqueeze(-1) * inv
    ang = torch.cat([ang, ang], -1).unsqueeze(1)
    return ang.cos(), ang.sin()


def layer_forward(layer, x, cos, sin, mask, past):
    """One decoder layer over the new positions x; past is (k, v) of earlier positions or None."""
    b, n, _ = x.shape
    h = layer.input_layernorm(x)
    q = layer.q_proj(h).view(b, n, layer.heads, layer.hd).transpose(1, 2)
    k = layer.k_proj(h).view(b, n, layer.kv, layer.hd).transpose(1, 2)
    v = layer.v_proj(h).view(b, n, layer.kv, layer.hd).transpose(1, 2)
    q, k = q * cos + train_ref.rotate_half(q) * sin, k * cos + train_ref.rotate_half(k) * sin
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    kept = (k, v)
    if layer.kv != layer.heads:
        k = k.repeat_interleave(layer.heads // layer.kv, 1)
        v = v.repeat_interleave(layer.heads // layer.kv, 1)
    a = train_ref.attention(q, k, v, mask).transpose(1, 2).reshape(b, n, -1)
    x = x + layer.o_proj(a)
    h = layer.post_attention_layernorm(x)
    return x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h)), kept


def decoder(model, x, start, caches):
    """The decoder over x (positions start..start+n-1); caches: a list to fill/extend, or None (no cache)."""
    n = x.size(1)
    cos, sin = rope(model, torch.arange(start, start + n).view(1, n))
    total = start + n
    # new position i (absolute start + i) sees every absolute position up to its own
    mask = torch.arange(total).view(1, total).le(torch.arange(start, total).view(n, 1)).view(1, 1, n, total)
    for li, layer in enumerate(model.layers):
        past = caches[li] if caches is not None and li < len(caches) else None
        x, kept = layer_forward(layer, x, cos, sin, mask, past)
        if caches is not None:
            if li < len(caches):
                caches[li] = kept
            else:
                caches.append(kept)
    return model.norm(x[:, -1])


@torch.no_grad()
def generate(model, images, ids, new_tokens, use_cache):
    feats = model.projector(model.vision(images))
    is_img = ids.eq(model.image_token_id)
    text = model.embed_tokens(ids.masked_fill(is_img, 0))
    p = int(is_img.long().argmax(1)[0])
    embeds = torch.cat([text[:, :p], feats, text[:, p + 1:]], 1)
    caches = [] if use_cache else None
    h = decoder(model, embeds, 0, caches)
    out = []
    for step in range(new_tokens):
        nxt = model.lm_head(h).argmax(-1)
        out.append(nxt)
        if step + 1 == new_tokens:
            break
        e = model.embed_tokens(nxt.view(-1, 1))
        if use_cache:
            h = decoder(model, e, embeds.size(1), caches)
            embeds = torch.cat([embeds, e], 1)
        else:
            embeds = torch.cat([embeds, e], 1)
            h = decoder(model, embeds, 0, None)
    return torch.stack(out, 1)


def main():
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    spec.setdefault("method", "linear")
    spec.setdefault("lora", None)
    model = train_ref.Llava(spec).eval()
    bt = spec["batch"]

    def load(name, dtype, shape):
        return torch.from_numpy(np.fromfile(bt["dir"] + "/" + name, dtype=dtype).reshape(shape))

    B, T, S, C = bt["B"], bt["T"], spec["vision"]["image_size"], spec["vision"]["num_channels"]
    images = load("images.f32", np.float32, (B, C, S, S))
    ids = load("input_ids.i64", np.int64, (B, T))
    n, cache = spec["new_tokens"], spec["use_cache"]
    train_ref.serve(lambda: generate(model, images, ids, n, cache))

if __name__ == "__main__":
    main()
