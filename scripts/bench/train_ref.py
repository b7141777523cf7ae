#!/usr/bin/env python3
"""The reference side of `emt bench train`: the same LLaVA-style model and training step written in plain PyTorch
eager, driven by emt over stdin/stdout so that both sides are timed in turns, in one run, on the same batch.

It runs under Debian's /usr/bin/python3 (PyTorch 1.13, the kernels emt links) or the .venv's Python (PyTorch 2.x).
emt writes a JSON spec (model shapes, method, optimizer settings, the batch's raw files) and starts it as
  train_ref.py SPEC.json
then sends lines "run N"; each answer is one line "ok MS_1 ... MS_N" (milliseconds per optimizer step); "peak"
answers "peak MIB" (this process's peak RSS); "quit" ends.
Weights are random: the figures are speed, not accuracy. The computation mirrors emt's: the vision tower runs
without gradients (no method here trains it), the image features replace the one image token, and logits are
computed only at supervised positions.
"""
import json
import math
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def attention(q, k, v, mask):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), v)


class ClipLayer(nn.Module):
    def __init__(self, v):
        super().__init__()
        d = v["hidden_size"]
        self.heads = v["num_heads"]
        self.layer_norm1 = nn.LayerNorm(d, eps=v["layer_norm_eps"])
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.layer_norm2 = nn.LayerNorm(d, eps=v["layer_norm_eps"])
        self.fc1 = nn.Linear(d, v["intermediate_size"])
        self.fc2 = nn.Linear(v["intermediate_size"], d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.layer_norm1(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        a = attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), None)
        x = x + self.out_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x))))


class ClipVision(nn.Module):
    def __init__(self, v):
        super().__init__()
        d, p = v["hidden_size"], v["patch_size"]
        n = (v["image_size"] // p) ** 2
        self.patch_embedding = nn.Conv2d(v["num_channels"], d, p, p, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d))
        self.position_embedding = nn.Parameter(torch.randn(n + 1, d) * 0.02)
        self.pre_layrnorm = nn.LayerNorm(d, eps=v["layer_norm_eps"])
        self.layers = nn.ModuleList(ClipLayer(v) for _ in range(v["num_layers"]))
        sel = v["select_layer"]
        self.depth = v["num_layers"] + 1 + sel if sel < 0 else sel
        self.patch_only = v["select_feature"] == "patch"

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.view(1, 1, -1).expand(x.size(0), 1, -1)
        x = self.pre_layrnorm(torch.cat([cls, x], 1) + self.position_embedding)
        for layer in self.layers[: self.depth]:
            x = layer(x)
        return x[:, 1:] if self.patch_only else x


class LoraLinear(nn.Module):
    """y = W x + (alpha / r) B A dropout(x), B zero-initialised (PEFT's LoRA)."""

    def __init__(self, i, o, lora):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / math.sqrt(i))
        self.lora = lora is not None
        if self.lora:
            r = lora["r"]
            self.lora_A = nn.Parameter(torch.randn(r, i) / math.sqrt(i))
            self.lora_B = nn.Parameter(torch.zeros(o, r))
            self.scale = lora["alpha"] / r
            self.dropout = nn.Dropout(lora["dropout"])

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.lora:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        return y


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    h = x.size(-1) // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


class LlamaLayer(nn.Module):
    def __init__(self, c, lora):
        super().__init__()
        d, hd = c["hidden_size"], c["hidden_size"] // c["num_heads"]
        self.heads, self.kv, self.hd = c["num_heads"], c["num_kv_heads"], hd
        t = lambda name: lora if lora is not None and name in lora["targets"] else None
        self.input_layernorm = RMSNorm(d, c["rms_norm_eps"])
        self.q_proj = LoraLinear(d, self.heads * hd, t("q_proj"))
        self.k_proj = LoraLinear(d, self.kv * hd, t("k_proj"))
        self.v_proj = LoraLinear(d, self.kv * hd, t("v_proj"))
        self.o_proj = LoraLinear(self.heads * hd, d, t("o_proj"))
        self.post_attention_layernorm = RMSNorm(d, c["rms_norm_eps"])
        self.gate_proj = LoraLinear(d, c["intermediate_size"], t("gate_proj"))
        self.up_proj = LoraLinear(d, c["intermediate_size"], t("up_proj"))
        self.down_proj = LoraLinear(c["intermediate_size"], d, t("down_proj"))

    def forward(self, x, cos, sin, mask, past=None):
        """x: the new positions; past: the (keys, values) of earlier positions, or None. With past given, returns
        (output, (keys, values)) so that generation can keep them (scripts/bench/eval_ref.py)."""
        b, n, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, n, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.kv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past is not None:
            if past[0] is not None:
                k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            kept = (k, v)
        if self.kv != self.heads:
            k = k.repeat_interleave(self.heads // self.kv, 1)
            v = v.repeat_interleave(self.heads // self.kv, 1)
        a = attention(q, k, v, mask).transpose(1, 2).reshape(b, n, -1)
        x = x + self.o_proj(a)
        h = self.post_attention_layernorm(x)
        out = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return out if past is None else (out, kept)


class Llava(nn.Module):
    def __init__(self, spec):
        super().__init__()
        v, c = spec["vision"], spec["llm"]
        lora = spec["lora"] if spec["method"] == "lora" else None
        self.vision = ClipVision(v)
        dv, d = v["hidden_size"], c["hidden_size"]
        if spec["projector"] == "mlp2x_gelu":
            self.projector = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))
        else:
            self.projector = nn.Linear(dv, d)
        self.embed_tokens = nn.Embedding(c["vocab_size"], d)
        self.layers = nn.ModuleList(LlamaLayer(c, lora) for _ in range(c["num_layers"]))
        self.norm = RMSNorm(d, c["rms_norm_eps"])
        self.lm_head = nn.Linear(d, c["vocab_size"], bias=False)
        self.hd, self.theta = d // c["num_heads"], c["rope_theta"]
        self.image_token_id = spec["image_token_id"]

    def rope(self, positions):
        """positions [B, T] -> the rotary cos and sin, [B, 1, T, head_dim]."""
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        ang = positions.float().unsqueeze(-1) * inv
        ang = torch.cat([ang, ang], -1).unsqueeze(1)
        return ang.cos(), ang.sin()

    def loss(self, images, ids, mask, labels):
        with torch.no_grad():
            feats = self.vision(images)
        feats = self.projector(feats)
        is_img = ids.eq(self.image_token_id)
        text = self.embed_tokens(ids.masked_fill(is_img, 0))
        b, t = ids.shape
        n = feats.size(1)
        # every row holds one image token; batches padded on the right put it at the same position
        p = int(is_img.long().argmax(1)[0])
        x = torch.cat([text[:, :p], feats, text[:, p + 1:]], 1)
        ones = torch.ones(b, n, dtype=mask.dtype)
        m = torch.cat([mask[:, :p], ones, mask[:, p + 1:]], 1)
        lab = torch.cat([labels[:, :p], torch.full((b, n), -100, dtype=labels.dtype), labels[:, p + 1:]], 1)
        total = x.size(1)
        pos = (m.cumsum(1) - 1).clamp_min(0) * m
        cos, sin = self.rope(pos)
        ar = torch.arange(total)
        causal = ar.view(1, -1).le(ar.view(-1, 1)).view(1, 1, total, total)
        attn_mask = (causal & m.ne(0).view(b, 1, 1, total)) | ar.view(1, -1).eq(ar.view(-1, 1)).view(1, 1, total, total)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask)
        h = self.norm(x)[:, :-1].reshape(-1, x.size(-1))
        lb = lab[:, 1:].reshape(-1)
        at = lb.ne(-100).nonzero().squeeze(1)
        return F.cross_entropy(self.lm_head(h.index_select(0, at)), lb.index_select(0, at))


def main():
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = Llava(spec)
    for prm in model.parameters():
        prm.requires_grad_(False)
    trained = list(model.projector.parameters())
    if spec["method"] == "full":
        for mod in [model.embed_tokens, model.layers, model.norm, model.lm_head]:
            trained += list(mod.parameters())
    elif spec["method"] == "lora":
        trained += [prm for name, prm in model.layers.named_parameters() if "lora_" in name]
    elif spec["method"] != "linear":
        sys.exit("train_ref.py: method must be linear, lora or full, got " + spec["method"])
    for prm in trained:
        prm.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(trained, lr=spec["lr"], betas=(spec["beta1"], spec["beta2"]), eps=spec["eps"],
                            weight_decay=spec["weight_decay"])
    bt = spec["batch"]

    def load(name, dtype, shape):
        return torch.from_numpy(np.fromfile(bt["dir"] + "/" + name, dtype=dtype).reshape(shape))

    B, T, S, C = bt["B"], bt["T"], spec["vision"]["image_size"], spec["vision"]["num_channels"]
    images = load("images.f32", np.float32, (B, C, S, S))
    ids, mask, labels = (load(n + ".i64", np.int64, (B, T)) for n in ("input_ids", "attention_mask", "labels"))
    clip = spec["max_grad_norm"]

    def step():
        loss = model.loss(images, ids, mask, labels)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, clip)
        opt.step()
        opt.zero_grad()
        return float(loss.detach())  # one host sync per step, as emt's loop

    serve(step)


def serve(unit):
    """The pipe protocol: "ready LABEL", then per "run N" the milliseconds of N calls of unit(), per "peak" this
    process's peak RSS in MiB; "quit" or end of input ends."""
    print("ready torch " + torch.__version__, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "peak":
            print("peak %.1f" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0), flush=True)
            continue
        times = []
        for _ in range(int(cmd[1])):
            t0 = time.perf_counter()
            unit()
            times.append((time.perf_counter() - t0) * 1e3)
        print("ok " + " ".join("%.3f" % t for t in times), flush=True)

if __name__ == "__main__":
    main()
