"""Shared pieces of the interop checks: the check registry and report, running emt's side (emt_interop), tiny
random LLaVA models built by transformers, and the inputs both sides evaluate."""
import json
import os
import subprocess
import time

import torch

TOL = 1e-4          # f32 logits, emt vs the Python reference
CORRUPT_MIN = 1e-3  # a deliberately corrupted variant must differ by more than this


class CheckFailed(Exception):
    pass


class Report:
    """Prints one line per check: PASS/FAIL, its name and what was measured."""

    def __init__(self, only=None):
        self.results = []
        self.only = only

    def run(self, name, fn, needed=False):
        """`needed`: other checks use what this one makes, so it also runs (unreported) when --only leaves it out."""
        if self.only and not any(o in name for o in self.only):
            if needed:
                try:
                    fn()
                except Exception:
                    pass
            return
        start = time.time()
        try:
            detail = fn() or ""
            ok = True
        except Exception as e:  # a check's failure is reported, the others still run
            ok, detail = False, f"{type(e).__name__}: {e}"
        self.results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({time.time() - start:.1f} s)  {detail}", flush=True)

    def summary(self):
        failed = [n for n, ok, _ in self.results if not ok]
        print(f"interop: {len(self.results) - len(failed)} passed, {len(failed)} failed")
        for n in failed:
            print(f"  failed: {n}")
        return 1 if failed else 0


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def max_diff(a, b):
    expect(tuple(a.shape) == tuple(b.shape), f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def close(a, b, what, tol=TOL):
    d = max_diff(a, b)
    expect(d <= tol, f"{what}: max abs diff {d:.3g} > {tol:g}")
    return d


def differs(a, b, what):
    """The sensitivity half of a check: a corrupted variant must NOT match."""
    d = max_diff(a, b) if tuple(a.shape) == tuple(b.shape) else float("inf")
    expect(d > CORRUPT_MIN, f"{what}: the corrupted variant still matches (max abs diff {d:.3g})")
    return d


class Emt:
    """emt's side: the emt_interop executable."""

    def __init__(self, exe):
        self.exe = exe

    def __call__(self, *args, expect_fail=False):
        r = subprocess.run([self.exe, *map(str, args)], capture_output=True, text=True)
        if expect_fail:
            expect(r.returncode != 0, f"emt_interop {args[0]} accepted what it should reject")
            return r.stderr
        if r.returncode != 0:
            raise CheckFailed(f"emt_interop {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stderr


def load_st(path):
    from safetensors.torch import load_file
    return load_file(path)


def save_st(path, tensors, metadata=None):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


# ---- tiny LLaVA models ------------------------------------------------------------------------------------------

VOCAB = 96
IMAGE_TOKEN = 95
PAD = 0
EOS = 2


def llava_config(act="gelu", layer=-2, strategy="default", image_size=16, patch=4):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                          image_size=image_size, patch_size=patch, projection_dim=32)
    # GQA: 4 query heads share 2 key/value heads.
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    n = (image_size // patch) ** 2 + (1 if strategy == "full" else 0)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, projector_hidden_act=act,
                       vision_feature_layer=layer, vision_feature_select_strategy=strategy, image_seq_length=n)


def num_image_tokens(cfg):
    v = cfg.vision_config
    return (v.image_size // v.patch_size) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)


def random_llava(cfg, seed):
    """A LlavaForConditionalGeneration whose weights are large enough that logits spread (greedy decoding then
    has no near-ties) and every norm and bias matters."""
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(seed)
    return randomize_weights(LlavaForConditionalGeneration(cfg))


def randomize_weights(module):
    """Norm weights near 1, biases of 0.1 spread, other weights N(0, 1/fan_in) (lm_head twice that); eval mode."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(1.0, p.shape[-1] ** 0.5) * (2.0 if "lm_head" in name else 1.0))
    return module.eval()


def make_inputs(cfg, seed, path):
    """Two batches for both sides: `full` (equal lengths, forward logits) and `gen` (left-padded, next-token logits
    and greedy tokens). emt gets one image token per row; transformers gets it expanded to the image's length."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision_config.image_size
    px = lambda b: torch.randn(b, 3, s, s, generator=g)
    text = lambda n: torch.randint(3, IMAGE_TOKEN - 1, (n,), generator=g).tolist()
    full_rows = [text(1) + [IMAGE_TOKEN] + text(5), text(3) + [IMAGE_TOKEN] + text(3)]
    gen_rows = [[1] + text(2) + [IMAGE_TOKEN] + text(4), [1, IMAGE_TOKEN] + text(3)]
    width = max(map(len, gen_rows))
    gen_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in gen_rows])
    gen_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in gen_rows])
    t = {"full.pixel_values": px(2), "full.input_ids": torch.tensor(full_rows),
         "full.attention_mask": torch.ones(2, len(full_rows[0]), dtype=torch.long),
         "gen.pixel_values": px(2), "gen.input_ids": gen_ids, "gen.attention_mask": gen_mask,
         "gen.max_new_tokens": torch.tensor(8), "gen.eos": torch.tensor(EOS)}
    save_st(path, t)
    return t


def expand_image_tokens(ids, mask, n):
    rows, masks = [], []
    for r, m in zip(ids.tolist(), mask.tolist()):
        i = r.index(IMAGE_TOKEN)
        rows.append(r[:i] + [IMAGE_TOKEN] * n + r[i + 1:])
        masks.append(m[:i] + [1] * n + m[i + 1:])
    return torch.tensor(rows), torch.tensor(masks)


@torch.no_grad()
def reference_outputs(model, cfg, inputs):
    """What transformers computes on `inputs`: the same three results emt_interop writes."""
    from transformers import GenerationConfig
    n = num_image_tokens(cfg)
    ids, mask = expand_image_tokens(inputs["full.input_ids"], inputs["full.attention_mask"], n)
    full = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["full.pixel_values"]).logits
    ids, mask = expand_image_tokens(inputs["gen.input_ids"], inputs["gen.attention_mask"], n)
    gc = GenerationConfig(max_new_tokens=int(inputs["gen.max_new_tokens"]), do_sample=False, pad_token_id=PAD,
                          eos_token_id=int(inputs["gen.eos"]), bos_token_id=1)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=inputs["gen.pixel_values"],
                         generation_config=gc, output_logits=True, return_dict_in_generate=True)
    # as emt returns them: each row up to its EOS (excluded), rows padded with -1
    rows = []
    for r in out.sequences[:, ids.shape[1]:].tolist():
        rows.append(r[:r.index(EOS)] if EOS in r else r)
    width = max(map(len, rows))
    tokens = torch.tensor([r + [-1] * (width - len(r)) for r in rows])
    return {"full.logits": full.float(), "gen.next_logits": out.logits[0].float(), "gen.tokens": tokens}


def compare_outputs(ref, got, what):
    """Logits within TOL, greedy tokens identical. Returns the measured diffs as text."""
    d_full = close(got["full.logits"], ref["full.logits"], f"{what}: forward logits")
    d_next = close(got["gen.next_logits"], ref["gen.next_logits"], f"{what}: next-token logits")
    expect(torch.equal(got["gen.tokens"], ref["gen.tokens"]),
           f"{what}: greedy tokens differ: emt {got['gen.tokens'].tolist()} vs {ref['gen.tokens'].tolist()}")
    return f"logits max|d| {max(d_full, d_next):.2e}, {ref['gen.tokens'].numel()} greedy tokens equal"


def hf_load(path, **kw):
    """from_pretrained that fails on any missing or unexpected key (transformers only warns)."""
    from transformers import LlavaForConditionalGeneration
    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    expect(not bad, f"transformers loading {path}: {bad}")
    return model.eval()


# llava-hf roots: (new layout, legacy layout)
ROOTS = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
         ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")]


def legacy_key(k):
    for new, old in ROOTS:
        if k.startswith(new):
            return old + k[len(new):]
    return k


def new_key(k):
    for new, old in ROOTS:
        if k.startswith(old):
            return new + k[len(old):]
    return k


def save_state_dict_layout(model, path):
    """The layout of the model's own state dict (before 4.52 the legacy one; from 4.52 model.language_model.*,
    lm_head.*; 5.x also model.vision_tower.embeddings.*), as anything that saves model.state_dict() writes it (and
    as PEFT names adapter tensors), with the config transformers writes."""
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    save_st(os.path.join(path, "model.safetensors"), dict(model.state_dict()), {"format": "pt"})


def randomize_peft(pm, seed):
    """Trained-looking PEFT weights: non-zero lora_A/lora_B everywhere and a moved modules_to_save copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def scratch(root, name):
    p = os.path.join(root, name)
    os.makedirs(p, exist_ok=True)
    return p
