"""The model goldens of test/fixtures/models (written by scripts/fixtures/make_model_goldens.py from the published
formulas, and used by the Catch2 tests without Python) agree with what transformers computes on the same weights
and inputs."""
import json
import os

import torch

from common import close, expect, new_key

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "models")


def read_fixture(name):
    from safetensors import safe_open
    with safe_open(os.path.join(FIXTURES, name), "pt") as f:
        config = json.loads(f.metadata()["config"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    weights = {k: v for k, v in t.items() if not k.startswith(("input.", "expected."))}
    return config, weights, t


def load_strict(model, weights):
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "inv_freq"))]
    expect(not missing and not unexpected, f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def register(report):
    @torch.no_grad()
    def clip():
        from transformers import CLIPConfig, CLIPModel
        cfg, w, t = read_fixture("clip.safetensors")
        # emt reads a text_config without eos_token_id as the legacy eos = 2 (pool at the argmax id), which is what
        # the golden computes; transformers' own default (49407) is not in this 40-token vocabulary.
        cfg["text_config"]["eos_token_id"] = 2
        model = load_strict(CLIPModel(CLIPConfig(**{k: v for k, v in cfg.items() if k != "model_type"})), w)
        v = model.vision_model(pixel_values=t["input.pixels"], output_hidden_states=True)
        tx = model.text_model(input_ids=t["input.ids"], attention_mask=t["input.mask"])
        real = t["input.mask"].bool().unsqueeze(-1).expand_as(tx.last_hidden_state)
        out = model(input_ids=t["input.ids"], attention_mask=t["input.mask"], pixel_values=t["input.pixels"])
        d = max(close(v.last_hidden_state, t["expected.vision_last_hidden"], "vision last hidden"),
                close(v.hidden_states[-2], t["expected.vision_hidden_m2"], "vision hidden[-2]"),
                close(v.pooler_output, t["expected.vision_pooled"], "vision pooled"),
                close(tx.last_hidden_state[real], t["expected.text_last_hidden"][real], "text last hidden"),
                close(tx.pooler_output, t["expected.text_pooled"], "text pooled"),
                close(out.logits_per_image, t["expected.logits_per_image"], "logits_per_image"))
        return f"CLIPModel: 6 outputs, max|d| {d:.1e}"
    report.run("fixtures.models[clip]: make_model_goldens.py == transformers CLIPModel", clip)

    @torch.no_grad()
    def llama():
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg, w, t = read_fixture("llama.safetensors")
        model = load_strict(LlamaForCausalLM(LlamaConfig(**cfg)), w)
        mask = t["input.mask"]
        logits = model(input_ids=t["input.ids"], attention_mask=mask, position_ids=positions(mask)).logits
        real = mask.bool().unsqueeze(-1).expand_as(logits)
        return f"LlamaForCausalLM logits max|d| {close(logits[real], t['expected.logits'][real], 'logits'):.1e}"
    report.run("fixtures.models[llama]: make_model_goldens.py == transformers LlamaForCausalLM", llama)

    @torch.no_grad()
    def llava():
        from transformers import LlavaConfig, LlavaForConditionalGeneration
        cfg, w, t = read_fixture("llava.safetensors")
        model = load_strict(LlavaForConditionalGeneration(LlavaConfig(**cfg)), {new_key(k): v for k, v in w.items()})
        image = cfg["image_token_index"]
        n = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2
        ids, mask, labels = [], [], []
        for r, m, lab in zip(t["input.ids"].tolist(), t["input.mask"].tolist(), t["input.labels"].tolist()):
            i = r.index(image)
            ids.append(r[:i] + [image] * n + r[i + 1:])
            mask.append(m[:i] + [1] * n + m[i + 1:])
            labels.append(lab[:i] + [-100] * n + lab[i + 1:])
        ids, mask, labels = torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=t["input.pixels"], labels=labels,
                    position_ids=positions(mask))
        expect(torch.equal(labels, t["expected.labels"]), "spliced labels differ")
        expect(torch.equal(mask, t["expected.mask"]), "spliced mask differs")
        real = mask.bool().unsqueeze(-1).expand_as(out.logits)
        d = close(out.logits[real], t["expected.logits"][real], "logits")
        dl = close(out.loss, t["expected.loss"], "loss")
        return f"LlavaForConditionalGeneration logits max|d| {d:.1e}, loss |d| {dl:.1e}"
    report.run("fixtures.models[llava]: make_model_goldens.py == transformers LlavaForConditionalGeneration", llava)
