"""LLaVA checkpoints: models written by transformers load in emt with the same logits and greedy tokens, and
emt's save_llava output loads in transformers with the same logits."""
import os
import shutil

import torch

from common import (close, compare_outputs, differs, expect, hf_load, llava_config, load_st, make_inputs,
                    random_llava, reference_outputs, save_st, save_state_dict_layout, scratch)

# (name, config options): the defaults of llava-1.5 and the options transformers' LlavaConfig offers.
VARIANTS = [
    ("gelu-layer-2-default", dict()),
    ("silu-layer-1-full", dict(act="silu", layer=-1, strategy="full")),
    ("gelu_pytorch_tanh-layer1-default", dict(act="gelu_pytorch_tanh", layer=1)),
    ("quick_gelu-layer0-full-12px", dict(act="quick_gelu", layer=0, strategy="full", image_size=12)),
]


def swap_tensors(src_dir, dst_dir, a, b):
    """A copy of a checkpoint with two same-shaped tensors exchanged (a permuted key map)."""
    shutil.copytree(src_dir, dst_dir, dirs_exist_ok=True)
    f = os.path.join(dst_dir, "model.safetensors")
    t = load_st(f)
    expect(t[a].shape == t[b].shape, f"{a} and {b} differ in shape")
    t[a], t[b] = t[b], t[a]
    save_st(f, t, {"format": "pt"})


def keys_of(path):
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return list(f.keys())


def register(report, emt, root):
    models = {}

    for i, (name, opts) in enumerate(VARIANTS):
        def check(name=name, opts=opts, seed=100 + i):
            d = scratch(root, f"llava-{name}")
            cfg = llava_config(**opts)
            model = random_llava(cfg, seed)
            inputs = make_inputs(cfg, seed, os.path.join(d, "inputs.safetensors"))
            ref = reference_outputs(model, cfg, inputs)
            legacy, new = os.path.join(d, "hf-legacy"), os.path.join(d, "hf-new")
            model.save_pretrained(legacy)
            expect(any(k.startswith("language_model.model.") for k in keys_of(legacy)),
                   "save_pretrained did not write the legacy layout")
            save_state_dict_layout(model, new)
            expect(any(k.startswith("model.language_model.") for k in keys_of(new)), "state dict is not new-style")
            out = []
            for layout, path in (("legacy", legacy), ("new", new)):
                emt("llava", path, os.path.join(d, "inputs.safetensors"), os.path.join(d, f"emt-{layout}.safetensors"))
                got = load_st(os.path.join(d, f"emt-{layout}.safetensors"))
                out.append(f"{layout}: " + compare_outputs(ref, got, f"{name} {layout} layout"))
            models[name] = (model, cfg, inputs, ref, d)
            return "; ".join(out)
        report.run(f"llava.load[{name}]: transformers save_pretrained + state-dict layouts -> emt", check,
                   needed=name in ("gelu-layer-2-default", "silu-layer-1-full"))

    def sensitivity():
        model, cfg, inputs, ref, d = models["gelu-layer-2-default"]
        bad = os.path.join(d, "hf-swapped")
        layer = "language_model.model.layers.1.mlp."
        swap_tensors(os.path.join(d, "hf-legacy"), bad, layer + "gate_proj.weight", layer + "up_proj.weight")
        emt("llava", bad, os.path.join(d, "inputs.safetensors"), os.path.join(d, "emt-swapped.safetensors"))
        got = load_st(os.path.join(d, "emt-swapped.safetensors"))
        dd = differs(got["full.logits"], ref["full.logits"], "gate_proj/up_proj swapped")
        # A tensor under a name transformers does not write is refused, not ignored.
        t = load_st(os.path.join(bad, "model.safetensors"))
        t["language_model.model.layers.0.mlp.gate.weight"] = t.pop("language_model.model.layers.0.mlp.gate_proj.weight")
        save_st(os.path.join(bad, "model.safetensors"), t, {"format": "pt"})
        err = emt("llava", bad, os.path.join(d, "inputs.safetensors"), os.path.join(d, "x.safetensors"),
                  expect_fail=True)
        expect("gate_proj" in err, f"emt's error does not name the missing tensor: {err.strip()[:200]}")
        return f"swapped gate/up: max|d| {dd:.2e} (caught); renamed tensor refused"
    report.run("llava.load[sensitivity]: a permuted key map is caught", sensitivity)

    for style, shard in (("old", None), ("new", None), ("new", 40000)):
        def check(style=style, shard=shard):
            dmax = 0.0
            for name in ("gelu-layer-2-default", "silu-layer-1-full"):
                model, cfg, inputs, ref, d = models[name]
                out = os.path.join(d, f"emt-saved-{style}-{shard or 'one'}")
                emt("save", os.path.join(d, "hf-legacy"), out, style, *([shard] if shard else []))
                expect(os.path.exists(os.path.join(out, "model.safetensors.index.json")) == bool(shard),
                       "sharding not as asked")
                back = hf_load(out)
                got = reference_outputs(back, back.config, inputs)
                what = f"{name}: transformers on emt's {style} file"
                dmax = max(dmax, close(got["full.logits"], ref["full.logits"], what),
                           close(got["gen.next_logits"], ref["gen.next_logits"], what + ", next-token logits"))
                expect(torch.equal(got["gen.tokens"], ref["gen.tokens"]), "greedy tokens differ")
                for k in ("projector_hidden_act", "vision_feature_layer", "vision_feature_select_strategy",
                          "image_token_index"):
                    expect(getattr(back.config, k) == getattr(cfg, k), f"config {k}: {getattr(back.config, k)!r}")
                sd, want = back.state_dict(), model.state_dict()
                wmax = max((sd[k] - want[k]).abs().max().item() for k in want)
            return f"2 variants: weights max|d| {wmax:.1e}, logits max|d| {dmax:.1e}, greedy tokens equal"
        label = f"{style}{', sharded' if shard else ''}"
        report.run(f"llava.save[{label}]: emt save_llava -> transformers from_pretrained", check)

    def save_sensitivity():
        model, cfg, inputs, ref, d = models["gelu-layer-2-default"]
        out = os.path.join(d, "emt-saved-old-one")
        bad = os.path.join(d, "emt-saved-swapped")
        layer = "language_model.model.layers.0.self_attn."
        swap_tensors(out, bad, layer + "q_proj.weight", layer + "o_proj.weight")
        back = hf_load(bad)
        got = reference_outputs(back, back.config, inputs)
        return f"swapped q/o: max|d| {differs(got['full.logits'], ref['full.logits'], 'q_proj/o_proj swapped'):.2e}"
    report.run("llava.save[sensitivity]: a permuted emt file is caught by transformers' logits", save_sensitivity)
    return models
