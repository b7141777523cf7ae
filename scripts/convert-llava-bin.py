#!/usr/bin/env python3
"""Converts a LLaVA (or LLaMA) checkpoint saved as PyTorch .bin shards into safetensors, which is what emt reads.

    python3 scripts/convert-llava-bin.py SRC_DIR DST_DIR

SRC_DIR holds pytorch_model.bin, or shards pytorch_model-0000K-of-0000N.bin with pytorch_model.bin.index.json
(as the published LLaVA-7b-v0 weights, once their delta is applied). DST_DIR receives one model-0000K-of-0000N
.safetensors per shard with the same tensor names, model.safetensors.index.json, and every other file of SRC_DIR
(config.json, tokenizer files, added_tokens.json, ...) copied unchanged. Tensor names, dtypes and values are kept
as they are. Needs the torch and safetensors Python packages (scripts/setup-python.sh installs both).
"""
import json
import os
import shutil
import sys


def shard_files(src):
    index = os.path.join(src, "pytorch_model.bin.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted(set(weight_map.values()))
    if os.path.exists(os.path.join(src, "pytorch_model.bin")):
        return ["pytorch_model.bin"]
    sys.exit(f"convert-llava-bin: {src} has neither pytorch_model.bin nor pytorch_model.bin.index.json")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    import torch
    from safetensors.torch import save_file

    shards = shard_files(src)
    if os.path.exists(dst) and os.listdir(dst):
        sys.exit(f"convert-llava-bin: {dst} is not empty")
    os.makedirs(dst, exist_ok=True)
    weight_map, total = {}, 0
    for k, name in enumerate(shards, 1):
        state = torch.load(os.path.join(src, name), map_location="cpu", weights_only=True)
        # safetensors stores each tensor on its own: no shared storage, contiguous.
        tensors = {key: t.detach().clone().contiguous() for key, t in state.items()}
        out = f"model-{k:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tmp = os.path.join(dst, out + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(dst, out))
        for key, t in tensors.items():
            weight_map[key] = out
            total += t.numel() * t.element_size()
        print(f"convert-llava-bin: {name} -> {out} ({len(tensors)} tensors)", flush=True)
        del state, tensors
    if len(shards) > 1:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for entry in os.listdir(src):
        if entry.endswith(".bin") or entry == "pytorch_model.bin.index.json":
            continue
        path = os.path.join(src, entry)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, entry))
    print(f"convert-llava-bin: {len(weight_map)} tensors, {total / 2**30:.2f} GiB, written to {dst}")


if __name__ == "__main__":
    main()
