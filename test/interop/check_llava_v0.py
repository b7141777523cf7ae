"""The original LLaVA v0 layout: a checkpoint saved as PyTorch .bin shards (LLaMA's own key names plus
model.mm_projector.*, the CLIP tower in its own folder named by mm_vision_tower), converted by
scripts/convert-llava-bin.py, loads in emt with the logits and greedy tokens of a reference built from
transformers' CLIPVisionModel and LlamaForCausalLM the way LLaVA v0 composes them: layer -2 patch features, one
linear projector, and the image wrapped in the <im_start>/<im_end> embeddings (mm_use_im_start_end)."""
import json
import os
import subprocess
import sys

import torch

from common import (EOS, IMAGE_TOKEN, compare_outputs, differs, expect, llava_config, load_st, make_inputs,
                    randomize_weights, scratch)

IM_START, IM_END = IMAGE_TOKEN - 2, IMAGE_TOKEN - 1
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def randomize(module, seed):
    torch.manual_seed(seed)
    return randomize_weights(module)


class V0Reference:
    """LLaVA v0's forward over transformers' modules: <im_start> + proj(CLIP layer -2 patches) + <im_end>."""

    def __init__(self, seed):
        from transformers import CLIPVisionModel, LlamaForCausalLM
        cfg = llava_config()
        self.vc, self.tc = cfg.vision_config, cfg.text_config
        self.clip = randomize(CLIPVisionModel(self.vc), seed)
        self.llama = randomize(LlamaForCausalLM(self.tc), seed + 1)
        self.proj = randomize(torch.nn.Linear(self.vc.hidden_size, self.tc.hidden_size), seed + 2)

    @torch.no_grad()
    def embeds(self, ids, pixels, mask):
        feats = self.proj(self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        emb = self.llama.model.embed_tokens
        rows, masks = [], []
        for r, m, f in zip(ids.tolist(), mask.tolist(), feats):
            i = r.index(IMAGE_TOKEN)
            se = emb(torch.tensor([IM_START, IM_END]))
            rows.append(torch.cat([emb(torch.tensor(r[:i])), se[:1], f, se[1:], emb(torch.tensor(r[i + 1:]))]))
            masks.append(m[:i] + [1] * (f.shape[0] + 2) + m[i + 1:])
        return torch.stack(rows), torch.tensor(masks)

    @torch.no_grad()
    def logits(self, embeds, mask):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        return self.llama(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits

    @torch.no_grad()
    def outputs(self, inputs):
        e, m = self.embeds(inputs["full.input_ids"], inputs["full.pixel_values"], inputs["full.attention_mask"])
        full = self.logits(e, m)
        e, m = self.embeds(inputs["gen.input_ids"], inputs["gen.pixel_values"], inputs["gen.attention_mask"])
        rows, first = [[] for _ in range(e.shape[0])], None
        done = [False] * e.shape[0]
        for _ in range(int(inputs["gen.max_new_tokens"])):  # greedy, recomputing the whole sequence
            last = self.logits(e, m)[:, -1]
            first = last if first is None else first
            nxt = last.argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    if t == EOS:
                        done[b] = True
                    else:
                        rows[b].append(t)
            e = torch.cat([e, self.llama.model.embed_tokens(nxt)[:, None]], 1)
            m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=m.dtype)], 1)
        width = max(map(len, rows))
        tokens = torch.tensor([r + [-1] * (width - len(r)) for r in rows])
        return {"full.logits": full.float(), "gen.next_logits": first.float(), "gen.tokens": tokens}

    def save_v0_bin(self, d, clip_dir, start_end=True):
        """The published layout: .bin shards with LLaMA's names plus model.mm_projector.*, a separate CLIP folder."""
        os.makedirs(d, exist_ok=True)
        self.clip.save_pretrained(clip_dir, safe_serialization=True)
        state = dict(self.llama.state_dict())
        state["model.mm_projector.weight"] = self.proj.weight.detach().clone()
        state["model.mm_projector.bias"] = self.proj.bias.detach().clone()
        keys = sorted(state)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for k, part in enumerate(halves, 1):
            name = f"pytorch_model-{k:05d}-of-00002.bin"
            torch.save({key: state[key] for key in part}, os.path.join(d, name))
            weight_map.update({key: name for key in part})
        with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
        cfg = self.tc.to_dict()
        cfg.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=clip_dir,
                   mm_hidden_size=self.vc.hidden_size, mm_vision_select_layer=-2, mm_use_im_start_end=start_end,
                   use_mm_proj=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(d, "added_tokens.json"), "w") as f:
            json.dump({"<im_patch>": IMAGE_TOKEN, "<im_start>": IM_START, "<im_end>": IM_END}, f)


def convert(src, dst):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert-llava-bin.py"), src, dst],
                       capture_output=True, text=True)
    expect(r.returncode == 0, f"convert-llava-bin failed: {r.stdout}{r.stderr}")


def register(report, emt, root):
    def check():
        d = scratch(root, "llava-v0")
        ref = V0Reference(seed=700)
        ref.save_v0_bin(os.path.join(d, "bin"), os.path.join(d, "clip"))
        convert(os.path.join(d, "bin"), os.path.join(d, "st"))
        expect(os.path.exists(os.path.join(d, "st", "model.safetensors.index.json")), "no shard index written")
        inputs = make_inputs(llava_config(), 701, os.path.join(d, "inputs.safetensors"))
        want = ref.outputs(inputs)
        emt("llava", os.path.join(d, "st"), os.path.join(d, "inputs.safetensors"), os.path.join(d, "emt.safetensors"))
        got = load_st(os.path.join(d, "emt.safetensors"))
        detail = compare_outputs(want, got, "llava v0")
        # Sensitivity: the same weights without the <im_start>/<im_end> wrapping are not what LLaVA v0 computes.
        ref.save_v0_bin(os.path.join(d, "bin-plain"), os.path.join(d, "clip"), start_end=False)
        convert(os.path.join(d, "bin-plain"), os.path.join(d, "st-plain"))
        emt("llava", os.path.join(d, "st-plain"), os.path.join(d, "inputs.safetensors"),
            os.path.join(d, "emt-plain.safetensors"))
        plain = load_st(os.path.join(d, "emt-plain.safetensors"))
        gap = differs(plain["gen.next_logits"], want["gen.next_logits"], "v0 without im_start/im_end")
        return f"{detail}; without the wrapping: {gap}"
    report.run("llava.v0: .bin shards -> convert-llava-bin.py -> emt, vs CLIP + LLaMA composed as LLaVA v0", check)
