"""safetensors: every dtype emt writes reads back in the safetensors library with the same values (bit for bit),
and files the library writes read in emt with the same values."""
import os

import torch

from common import expect

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def expected_tensor(dtype, n):
    """The values of emt_interop's pattern() (test/interop/emt_interop.cpp)."""
    x = torch.arange(n, dtype=torch.float64)
    if dtype == "BOOL":
        return torch.remainder(x, 3) == 1
    if dtype == "U8":
        return torch.remainder(x * 37, 256).to(torch.uint8)
    if dtype == "I8":
        return (torch.remainder(x * 37, 256) - 128).to(torch.int8)
    if dtype == "I16":
        return (x * 4099 - 30000).to(torch.int16)
    if dtype == "I32":
        return (x * 1e8 - 7e8).to(torch.int32)
    if dtype == "I64":
        return (x * 1e9 - 3e9).to(torch.int64)
    return ((x * 0.37 - 5.0) * (torch.remainder(x, 2) * 2 - 1)).to(DTYPES[dtype])


def same_bits(a, b):
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def register(report, emt, root):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def emt_writes():
        path = os.path.join(root, "st-emt.safetensors")
        emt("st-write", path)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            got = {k: f.get_tensor(k) for k in f.keys()}
        expect(meta == {"format": "pt", "writer": "emt"}, f"metadata {meta}")
        for d in DTYPES:
            expect(same_bits(got[d], expected_tensor(d, 15).reshape(3, 5)), f"{d}: values differ: {got[d]}")
        expect(same_bits(got["scalar_bf16"], expected_tensor("BF16", 2)[1].reshape(())), "0-d bf16 differs")
        expect(got["empty_f32"].shape == (0, 4) and got["empty_f32"].dtype == torch.float32, "empty tensor differs")
        # sensitivity: the same bytes under a wrong dtype name do not pass
        raw = bytearray(open(path, "rb").read())
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n].decode()
        expect('"dtype":"BF16"' in header, "no BF16 in the header")
        bad = os.path.join(root, "st-emt-mislabelled.safetensors")
        with open(bad, "wb") as f:
            f.write(raw[:8] + header.replace('"dtype":"BF16"', '"dtype":"F16" ', 1).encode() + raw[8 + n:])
        t = load_file(bad)
        wrong = [k for k in ("BF16", "scalar_bf16") if t[k].dtype == torch.float16]
        expect(len(wrong) == 1, f"the mislabelled file has no F16 tensor where BF16 was: {wrong}")
        k = wrong[0]
        expect(not torch.equal(t[k].float(), got[k].float()), "a BF16 tensor read as F16 still matched")
        return f"{len(DTYPES)} dtypes + 0-d + empty bit-identical in the library; BF16 mislabelled as F16 caught"
    report.run("safetensors.read: every dtype emt writes -> safetensors library", emt_writes)

    def library_writes():
        src = os.path.join(root, "st-lib.safetensors")
        g = torch.Generator().manual_seed(5)
        t = {}
        for d, dt in DTYPES.items():
            r = torch.randn(4, 7, generator=g) * 1000
            t[d.lower()] = r > 0 if dt == torch.bool else r.to(dt)
        t["bf16_scalar"] = torch.tensor(-3.140625, dtype=torch.bfloat16)
        t["f32_empty"] = torch.zeros(2, 0)
        t["f16_specials"] = torch.tensor([float("inf"), -float("inf"), 65504.0, 6e-8, -0.0], dtype=torch.float16)
        t["bf16_big"] = torch.randn(3, 1000, generator=g).to(torch.bfloat16)
        save_file(t, src, metadata={"format": "pt", "note": "written by safetensors"})
        dst = os.path.join(root, "st-lib-via-emt.safetensors")
        emt("st-copy", src, dst)
        back = load_file(dst)
        with safe_open(dst, "pt") as f:
            meta = f.metadata()
        expect(meta == {"format": "pt", "note": "written by safetensors"}, f"metadata {meta}")
        expect(set(back) == set(t), f"names differ: {sorted(set(back) ^ set(t))}")
        for k in t:
            expect(same_bits(back[k], t[k]), f"{k}: values differ after emt read + write")
        return f"{len(t)} tensors (all dtypes, 0-d, empty, inf/-0/subnormal f16) bit-identical through emt"
    report.run("safetensors.write: safetensors library files -> emt reader (-> emt writer -> library)", library_writes)
