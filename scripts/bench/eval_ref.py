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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_ref  # noqa: E402  (the model classes and the pipe protocol)


def decoder(model, x, start, caches):
    """The decoder over x (positions start..start+n-1); caches: one (keys, values) per layer, updated in place, or
    None (no cache: x is the whole sequence)."""
    n = x.size(1)
    cos, sin = model.rope(torch.arange(start, start + n).view(1, n))
    total = start + n
    # new position i (absolute start + i) sees every absolute position up to its own
    mask = torch.arange(total).view(1, total).le(torch.arange(start, total).view(n, 1)).view(1, 1, n, total)
    for li, layer in enumerate(model.layers):
        if caches is None:
            x = layer(x, cos, sin, mask)
        else:
            x, caches[li] = layer(x, cos, sin, mask, caches[li])
    return model.norm(x[:, -1])


@torch.no_grad()
def generate(model, images, ids, new_tokens, use_cache):
    feats = model.projector(model.vision(images))
    is_img = ids.eq(model.image_token_id)
    text = model.embed_tokens(ids.masked_fill(is_img, 0))
    p = int(is_img.long().argmax(1)[0])
    embeds = torch.cat([text[:, :p], feats, text[:, p + 1:]], 1)
    caches = [(None, None)] * len(model.layers) if use_cache else None
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
