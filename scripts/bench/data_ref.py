#!/usr/bin/env python3
"""The reference side of `emt bench data`: decode a PNG file and preprocess it for CLIP, the way Python users do.

emt starts it as `data_ref.py SPEC.json`; the spec names the image file, the output size, the implementation and a
path for the preprocessed tensor:
  impl "transformers": PIL's Image.open + convert("RGB"), then transformers' CLIPImageProcessor (shortest-edge
                       bicubic resize, centre crop, rescale, normalize with CLIP's mean and std);
  impl "pil":          the same steps written with PIL (resize, crop) and numpy (rescale, normalize).
Before answering "ready LABEL" it writes its result for the image to spec["out"] (float32 [3, S, S], raw) so
that emt can compare it with its own. Then each "run N" line is answered with "ok MS_1 ... MS_N" (milliseconds
per image: decode + preprocess); "quit" ends. Needs Pillow and numpy (and transformers for impl "transformers").
"""
import json
import sys
import time

import numpy as np
from PIL import Image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def make_pil(size):
    def run(path):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        short = min(w, h)
        nw, nh = (size, int(h * size / w)) if w == short else (int(w * size / h), size)
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
        return ((x - MEAN) / STD).transpose(2, 0, 1)

    return run


def make_transformers(size):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def run(path):
        img = Image.open(path).convert("RGB")
        return proc(images=img, return_tensors="np")["pixel_values"][0]

    return run


def main():
    spec = json.load(open(sys.argv[1]))
    impl = spec["impl"]
    if impl == "pil":
        run = make_pil(int(spec["size"]))
        label = "PIL %s + numpy %s" % (Image.__version__, np.__version__)
    elif impl == "transformers":
        import transformers

        run = make_transformers(int(spec["size"]))
        label = "CLIPImageProcessor %s, PIL %s" % (transformers.__version__, Image.__version__)
    else:
        raise SystemExit("data_ref.py: unknown impl %r (transformers | pil)" % impl)
    try:
        import torch

        torch.set_num_threads(int(spec.get("threads", 1)))
    except ImportError:
        pass
    out = np.ascontiguousarray(run(spec["file"]), dtype=np.float32)
    out.tofile(spec["out"])
    print("ready " + label, flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] != "run" or len(words) != 2:
            print("error: unknown command " + line.strip(), flush=True)
            continue
        ms = []
        for _ in range(int(words[1])):
            t0 = time.perf_counter()
            run(spec["file"])
            ms.append((time.perf_counter() - t0) * 1e3)
        print("ok " + " ".join("%.4f" % m for m in ms), flush=True)


if __name__ == "__main__":
    main()
