"""Writes test/fixtures/adapters/ with the real PEFT: adapter_config.json texts and the adapter tensor names and
shapes PEFT saves for a LLaVA model shaped like test/test_adapters_fake.h (2 decoder layers, D=16, MLP 24, vocab
20, rank 4, mlp2x_gelu projector 12->16). The new key style comes from the venv's transformers (>= 4.52), the old
one from the pinned older transformers:

  .venv/bin/python test/interop/make_peft_fixtures.py new
  PYTHONPATH=.venv/transformers-4.51 .venv/bin/python test/interop/make_peft_fixtures.py old
"""
import json
import os
import sys
import tempfile
import warnings

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "adapters")
NAMES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
BASE = "llava-hf/llava-1.5-7b-hf"


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vc = CLIPVisionConfig(hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                          image_size=8, patch_size=4)
    tc = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_index=19))
    model.name_or_path = BASE  # what PEFT records as base_model_name_or_path
    return model


def lora(style):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    # emt writes this regex (adapters/peft.cpp): the vision tower also has q/k/v_proj, and the leading ".*" makes
    # it select the language model's layers in both key styles.
    pm = get_peft_model(tiny_llava(), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM", modules_to_save=["multi_modal_projector"],
        target_modules=r".*language_model\..*\.(" + "|".join(NAMES) + ")"))
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        with open(os.path.join(d, "adapter_config.json")) as f:
            config = f.read()
        from safetensors import safe_open
        with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
            keys = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    prefix = "base_model.model.language_model.model." if style == "old" else "base_model.model.model.language_model."
    assert any(k.startswith(prefix) for k in keys), f"this transformers does not write the {style} key style"
    write(f"lora_config_{style}.json", config)
    write(f"lora_keys_{style}.json", json.dumps(keys, indent=2, sort_keys=True))


def prompt():
    from peft import PromptTuningConfig
    cfg = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the image", tokenizer_name_or_path=BASE, base_model_name_or_path=BASE,
        token_dim=16, num_attention_heads=2, num_layers=2, num_transformer_submodules=1, inference_mode=True)
    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)
        with open(os.path.join(d, "adapter_config.json")) as f:
            write("prompt_config.json", f.read())


def write(name, text):
    with open(os.path.join(OUT, name), "w") as f:
        f.write(text)
    print(f"wrote {name}")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    style = sys.argv[1]
    lora(style)
    if style == "new":
        prompt()
