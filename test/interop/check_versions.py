"""Checks against the other pinned transformers versions, run through other_version.py in a subprocess with
PYTHONPATH at that version's site dir: 4.51 (legacy module tree: its models and PEFT adapters use legacy names)
and 5.x (PEFT 0.17 does not import with it, so models only). Their files load in emt with the same outputs, and
emt's files load there."""
import os
import subprocess
import sys

from common import CheckFailed, compare_outputs, expect, load_st, scratch, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


def register(report, emt, root, site_dir, with_peft, save_styles):
    def run_there(*args, script="other_version.py"):
        cmd = [sys.executable, os.path.join(HERE, script), *args] if script else [sys.executable, *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=site_dir))

    r = run_there("-c", "import transformers; print(transformers.__version__)", script=None)
    ver = r.stdout.strip()
    if r.returncode != 0 or not ver:
        def missing():
            raise CheckFailed(f"no transformers under {site_dir}: run scripts/setup-python.sh")
        report.run(f"transformers at {site_dir}", missing)
        return
    d = scratch(root, f"transformers-{ver}")
    inp = os.path.join(d, "inputs.safetensors")

    def there(*args):
        r = run_there(*args)
        if r.returncode != 0:
            raise CheckFailed(f"other_version.py {args[0]} under transformers {ver} failed: {r.stderr.strip()[-600:]}")

    def same(ref, got, what):
        return compare_outputs(load_st(os.path.join(d, ref)), load_st(os.path.join(d, got)), what)

    def load_check():
        there("model", d)
        out = []
        for layout in ("base", "base-state"):
            from safetensors import safe_open
            with safe_open(os.path.join(d, layout, "model.safetensors"), "pt") as f:
                vision = next(k for k in f.keys() if "vision_tower" in k and "embeddings" in k)
            emt("llava", os.path.join(d, layout), inp, os.path.join(d, f"emt-{layout}.safetensors"))
            what = "save_pretrained" if layout == "base" else "state dict"
            out.append(f"{what} ({vision.split('embeddings')[0]}*): " +
                       same("ref.safetensors", f"emt-{layout}.safetensors", f"transformers {ver} {what} in emt"))
        return "; ".join(out)
    report.run(f"llava.load[transformers {ver}]: its save_pretrained + state-dict layouts -> emt", load_check,
               needed=True)

    for style in save_styles:
        def save_check(style=style):
            out = os.path.join(d, f"emt-saved-{style}")
            emt("save", os.path.join(d, "base"), out, style)
            there("load", d, out, os.path.join(d, f"there-on-emt-{style}.safetensors"))
            return same("ref.safetensors", f"there-on-emt-{style}.safetensors", f"emt's {style} file in {ver}")
        report.run(f"llava.save[{style}, transformers {ver}]: emt save_llava -> its from_pretrained", save_check)

    if not with_peft:
        return

    def peft_load_check():
        there("peft", d)
        keys = list(load_st(os.path.join(d, "peft-adapter", "adapter_model.safetensors")))
        expect(any(k.startswith("base_model.model.language_model.model.") for k in keys),
               f"transformers {ver}'s PEFT adapter is not in the legacy layout: {keys[:2]}")
        emt("llava", os.path.join(d, "base"), inp, os.path.join(d, "emt-peft.safetensors"),
            os.path.join(d, "peft-adapter"))
        return same("peft-ref.safetensors", "emt-peft.safetensors", f"transformers {ver} PEFT adapter in emt")
    report.run(f"peft.load[transformers {ver}, legacy keys, rsLoRA + rank_pattern + vision tower]: PEFT -> emt",
               peft_load_check, needed=True)

    def peft_save_check():
        settings = dict(r=4, alpha=8, key_style="old", use_rslora=True, rank_pattern={"q_proj": 2}, seed=7)
        write_json(os.path.join(d, "settings.json"), settings)
        adapter = os.path.join(d, "emt-adapter")
        emt("train-lora", os.path.join(d, "base"), inp, os.path.join(d, "settings.json"), adapter)
        emt("llava", os.path.join(d, "base"), inp, os.path.join(d, "emt-own.safetensors"), adapter)
        there("peft-load", d, adapter, os.path.join(d, "there-peft-on-emt.safetensors"))
        return same("there-peft-on-emt.safetensors", "emt-own.safetensors",
                    f"emt's old-style adapter in PeftModel on transformers {ver}")
    report.run(f"peft.save[old-style, transformers {ver}]: emt train + save_lora_adapter -> PeftModel", peft_save_check,
               needed=True)

    def current_loads_legacy():
        # PEFT on this process's transformers (new-style module tree) loads legacy-named adapters: its own from
        # the older version, and emt's old-style ones with the same logits.
        from peft import PeftModel
        from common import hf_load, reference_outputs
        inputs = load_st(inp)
        out = []
        for adapter, want in (("peft-adapter", "peft-ref.safetensors"), ("emt-adapter", "emt-own.safetensors")):
            pm = PeftModel.from_pretrained(hf_load(os.path.join(d, "base")), os.path.join(d, adapter)).eval()
            out.append(compare_outputs(load_st(os.path.join(d, want)),
                                       reference_outputs(pm, pm.base_model.model.config, inputs),
                                       f"{adapter} in PeftModel on the current transformers"))
        return f"PEFT on {ver}'s: {out[0]}; emt's: {out[1]}"
    report.run("peft.save[old-style, current transformers]: legacy-named adapters load like PEFT's own",
               current_loads_legacy)
