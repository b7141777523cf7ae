"""The reference side for another pinned transformers (run with PYTHONPATH at its site dir): the older 4.51
(whose LLaVA module tree IS the legacy layout, so its PEFT adapters name `language_model.model.*`) and 5.x (which
writes a LLaVA built from a config with a vision tower without `vision_model.`). check_versions.py drives it:

  other_version.py model DIR              base model (save_pretrained + state-dict layout), inputs, its outputs
  other_version.py peft DIR               a PEFT adapter for the base and PeftModel's outputs
  other_version.py peft-load DIR ADAPTER OUT     PeftModel with ADAPTER (tensors checked), outputs to OUT
  other_version.py load DIR MODEL_DIR OUT        from_pretrained(MODEL_DIR) (strict), outputs to OUT
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (expect, hf_load, llava_config, load_st, make_inputs, random_llava,  # noqa: E402
                    randomize_peft, reference_outputs, save_st, save_state_dict_layout)

SEED = 300


def outputs(model, cfg, d, out):
    save_st(out, reference_outputs(model, cfg, load_st(os.path.join(d, "inputs.safetensors"))))


def model(d):
    cfg = llava_config(act="gelu", layer=-2)
    m = random_llava(cfg, SEED)
    m.save_pretrained(os.path.join(d, "base"))
    save_state_dict_layout(m, os.path.join(d, "base-state"))
    make_inputs(cfg, SEED, os.path.join(d, "inputs.safetensors"))
    outputs(m, cfg, d, os.path.join(d, "ref.safetensors"))


def peft(d):
    from peft import LoraConfig, get_peft_model
    m = hf_load(os.path.join(d, "base"))
    pm = get_peft_model(m, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True, modules_to_save=["multi_modal_projector"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"layers.1.mlp.down_proj": 2}))
    randomize_peft(pm, SEED).save_pretrained(os.path.join(d, "peft-adapter"))
    outputs(pm.eval(), m.config, d, os.path.join(d, "peft-ref.safetensors"))


def peft_load(d, adapter, out):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    pm = PeftModel.from_pretrained(hf_load(os.path.join(d, "base")), adapter).eval()
    file_t = load_st(os.path.join(adapter, "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(pm)
    expect(set(file_t) == set(loaded), f"PEFT did not take the file's tensors: {sorted(set(file_t) ^ set(loaded))[:4]}")
    for k, v in file_t.items():
        expect(torch.equal(loaded[k].to(v.dtype), v), f"{k} differs after loading")
    outputs(pm, pm.base_model.model.config, d, out)


def load(d, model_dir, out):
    m = hf_load(model_dir)
    outputs(m, m.config, d, out)


if __name__ == "__main__":
    import warnings
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    cmd, args = sys.argv[1], sys.argv[2:]
    {"model": model, "peft": peft, "peft-load": peft_load, "load": load}[cmd](*args)
