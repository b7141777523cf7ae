"""PEFT LoRA adapters: adapters that PEFT saves load in emt with PeftModel's logits, adapters that emt trains and
saves load in PeftModel with emt's logits, and merging gives the same weights on both sides."""
import os
import shutil

import torch

from common import (close, compare_outputs, differs, expect, hf_load, legacy_key, load_st, randomize_peft,
                    read_json, reference_outputs, save_st, scratch, write_json)

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LM_REGEX = r".*language_model.*\.(" + "|".join(NAMES) + ")"

# (name, LoraConfig options). The plain name list also selects the vision tower's q/k/v projections, as it does
# for every user who passes LLaVA's list without a regex.
PEFT_VARIANTS = [
    ("list+projector", dict(r=4, lora_alpha=8, target_modules=NAMES)),
    ("rslora+rank_pattern", dict(r=4, lora_alpha=8, target_modules=LM_REGEX, use_rslora=True,
                                 rank_pattern={"layers.1.mlp.down_proj": 2, "v_proj": 6},
                                 alpha_pattern={"o_proj": 3})),
]

# emt-trained adapters: (name, emt_interop train-lora settings). Old-style (language_model.model.*) adapters are
# checked against the older transformers in check_legacy.py: PEFT on transformers >= 4.52 targets new-style paths.
EMT_VARIANTS = [
    ("new-style", dict(r=4, alpha=8, key_style="new", seed=1)),
    ("new-style rslora+rank_pattern bf16",
     dict(r=4, alpha=16, key_style="new", use_rslora=True, dtype="bf16", target_regex=LM_REGEX,
          rank_pattern={"v_proj": 2, "layers.0.mlp.up_proj": 6}, alpha_pattern={"down_proj": 4}, seed=2)),
]


def peft_adapter(base_dir, opts, seed, out_dir):
    """get_peft_model + save_pretrained with trained-looking (non-zero) deltas and projector."""
    from peft import LoraConfig, get_peft_model
    model = hf_load(base_dir)
    pm = get_peft_model(model, LoraConfig(lora_dropout=0.0, modules_to_save=["multi_modal_projector"], **opts))
    randomize_peft(pm, seed).save_pretrained(out_dir)
    return pm.eval()


def edit_adapter(src, dst, config_edit=None, tensor_edit=None):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    if config_edit:
        cfg = read_json(os.path.join(dst, "adapter_config.json"))
        config_edit(cfg)
        write_json(os.path.join(dst, "adapter_config.json"), cfg)
    if tensor_edit:
        f = os.path.join(dst, "adapter_model.safetensors")
        t = load_st(f)
        tensor_edit(t)
        save_st(f, t, {"format": "pt"})


def register(report, emt, root, models):
    base_name = "gelu-layer-2-default"
    adapters = {}

    def base():
        _, cfg, inputs, _, d = models[base_name]
        return cfg, inputs, os.path.join(d, "hf-legacy"), os.path.join(d, "inputs.safetensors")

    for i, (name, opts) in enumerate(PEFT_VARIANTS):
        def check(name=name, opts=opts, seed=10 + i):
            cfg, inputs, base_dir, inp = base()
            d = scratch(root, f"peft-{name}")
            pm = peft_adapter(base_dir, opts, seed, os.path.join(d, "adapter"))
            ref = reference_outputs(pm, cfg, inputs)
            keys = list(load_st(os.path.join(d, "adapter", "adapter_model.safetensors")))
            emt("llava", base_dir, inp, os.path.join(d, "emt.safetensors"), os.path.join(d, "adapter"),
                os.path.join(d, "emt-merged"))
            got = load_st(os.path.join(d, "emt.safetensors"))
            res = compare_outputs(ref, got, f"PEFT adapter {name} in emt (merged)")
            # merged weights: PeftModel.merge_and_unload vs emt's merge_lora, tensor by tensor
            merged = pm.merge_and_unload().state_dict()
            mine = load_st(os.path.join(d, "emt-merged", "model.safetensors"))
            expect(set(map(legacy_key, merged)) == set(mine), "merged models have different tensor names")
            wmax = max(close(mine[legacy_key(k)], v, f"merged {k}", 1e-5) for k, v in merged.items())
            emt("llava", base_dir, inp, os.path.join(d, "emt-unmerged.safetensors"), os.path.join(d, "adapter"))
            res2 = compare_outputs(ref, load_st(os.path.join(d, "emt-unmerged.safetensors")), f"{name} unmerged")
            adapters[name] = (ref, d)
            return (f"{len(keys)} tensors ({keys[0].split('.layers')[0]}...); unmerged {res2}; merged {res}; "
                    f"merged weights max|d| {wmax:.1e}")
        report.run(f"peft.load[{name}]: PEFT save_pretrained -> emt (logits, merge)", check, needed=True)

    def sensitivity():
        cfg, inputs, base_dir, inp = base()
        ref, d = adapters["rslora+rank_pattern"]

        def swap(t):  # two layers' deltas exchanged (a permuted key map)
            a = [k for k in t if "layers.0.self_attn.q_proj.lora_B" in k][0]
            b = a.replace("layers.0", "layers.1")
            t[a], t[b] = t[b], t[a]

        out = []
        for what, edits in (("rsLoRA dropped (alpha / r)", dict(config_edit=lambda c: c.update(use_rslora=False))),
                            ("alpha_pattern dropped", dict(config_edit=lambda c: c.update(alpha_pattern={}))),
                            ("layer 0/1 q_proj lora_B swapped", dict(tensor_edit=swap))):
            bad = os.path.join(d, what.split()[0])
            edit_adapter(os.path.join(d, "adapter"), bad, **edits)
            emt("llava", base_dir, inp, bad + ".safetensors", bad)
            dd = differs(load_st(bad + ".safetensors")["full.logits"], ref["full.logits"], what)
            out.append(f"{what}: max|d| {dd:.2e}")
        # rank_pattern dropped: the file's ranks no longer agree with the config, which emt refuses
        bad = os.path.join(d, "no-rank")
        edit_adapter(os.path.join(d, "adapter"), bad, config_edit=lambda c: c.update(rank_pattern={}))
        err = emt("llava", base_dir, inp, bad + ".safetensors", bad, expect_fail=True)
        expect("rank" in err, f"unexpected error: {err.strip()[:200]}")
        out.append("rank_pattern dropped: refused")
        return "; ".join(out)
    report.run("peft.load[sensitivity]: dropped rsLoRA / alpha_pattern, swapped deltas are caught", sensitivity)

    trained = {}
    for i, (name, settings) in enumerate(EMT_VARIANTS):
        def check(name=name, settings=settings):
            from peft import PeftModel
            from peft.utils import get_peft_model_state_dict
            cfg, inputs, base_dir, inp = base()
            d = scratch(root, f"emt-lora-{name.replace(' ', '_')}")
            write_json(os.path.join(d, "settings.json"), settings)
            adapter = os.path.join(d, "adapter")
            emt("train-lora", base_dir, inp, os.path.join(d, "settings.json"), adapter)
            emt("llava", base_dir, inp, os.path.join(d, "emt.safetensors"), adapter)
            got = load_st(os.path.join(d, "emt.safetensors"))
            pm = PeftModel.from_pretrained(hf_load(base_dir), adapter).eval()
            # every tensor of the file arrived in the PeftModel (PEFT only warns about the ones it skips)
            file_t = load_st(os.path.join(adapter, "adapter_model.safetensors"))
            loaded = get_peft_model_state_dict(pm)
            expect(set(file_t) == set(loaded), f"PEFT did not take the file's tensors as they are: missing "
                   f"{sorted(set(file_t) - set(loaded))[:3]}, PEFT has {sorted(set(loaded) - set(file_t))[:3]}")
            for k, v in file_t.items():
                expect(torch.equal(loaded[k].to(v.dtype), v), f"{k} differs after loading")
            ref = reference_outputs(pm, cfg, inputs)
            trained[name] = (adapter, got)
            base_ref = models[base_name][3]
            moved = (got["full.logits"] - base_ref["full.logits"]).abs().max().item()
            expect(moved > 1e-2, f"the trained adapter does not change the logits ({moved:.2e})")
            return f"{len(file_t)} tensors; " + compare_outputs(ref, got, f"emt adapter {name} in PeftModel") + \
                f"; adapter moves logits by {moved:.2f}"
        report.run(f"peft.save[{name}]: emt train + save_lora_adapter -> PeftModel", check, needed=True)

    def save_sensitivity():
        from peft import PeftModel
        cfg, inputs, base_dir, _ = base()
        adapter, got = trained["new-style rslora+rank_pattern bf16"]
        out = []
        for what, edit in (("rsLoRA dropped", lambda c: c.update(use_rslora=False)),
                           ("rank_pattern dropped", lambda c: c.update(rank_pattern={})),
                           ("alpha_pattern dropped", lambda c: c.update(alpha_pattern={}))):
            bad = adapter + "-" + what.split()[0]
            edit_adapter(adapter, bad, config_edit=edit)
            try:
                pm = PeftModel.from_pretrained(hf_load(base_dir), bad).eval()
            except Exception as e:  # PEFT refuses the file's shapes
                out.append(f"{what}: PEFT refuses ({type(e).__name__})")
                continue
            ref = reference_outputs(pm, cfg, inputs)
            out.append(f"{what}: max|d| {differs(got['full.logits'], ref['full.logits'], what):.2e}")
        return "; ".join(out)
    report.run("peft.save[sensitivity]: emt's adapter with rsLoRA / patterns dropped no longer matches in PeftModel",
               save_sensitivity)
