"""Tokenizers: emt's SentencePiece tokenizer against transformers' LLaMA tokenizers (slow and fast, with added
and special tokens), and emt's CLIP BPE against open_clip's SimpleTokenizer with its real 49,408-token vocabulary
(and transformers' CLIPTokenizer built from the same files)."""
import os
import shutil

from common import expect, read_json, write_json

TRAIN_TEXT = """What is the number in the image? Please only answer a single number in 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.
What is the object in the image? Please only answer a single object in airplane, automobile, bird, cat, deer, dog.
The object is a(n) frog. The object is a(n) horse. The object is a(n) ship. The object is a(n) truck.
A chat between a curious human and an artificial intelligence assistant. USER: ASSISTANT: The assistant gives
helpful, detailed, and polite answers to the human's questions. It's a photo of the number seven, isn't it?
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant"""

SPM_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. USER: <image>\nWhat is the number in "
    "the image? Please only answer a single number in 0, 1, 2, 3, 4, 5, 6, 7, 8, 9. ASSISTANT:",
    "USER: <image>\nWhat is the object in the image? ASSISTANT: The object is a(n) aquarium_fish.",
    "<image>", "<image><image>", "a<image>b", "x <image> y", "<image>\n", "<pad>", "text <pad><pad>",
    "", " ", "   ", " leading space", "trailing space ", "double  space  inside", "tabs\tand\nnew\nlines",
    "numbers 1234567890 and 3.14159", "café naïve façade Ünïcödé", "日本語のテキスト", "emoji 🐱🚀 and ✓",
    "don't won't it's the dog's", "UPPER lower MiXeD", "unseen qzxjv words", "<s> literal specials </s>",
    "a\u00a0non-breaking space", "line one\r\nline two",
]

CLIP_CORPUS = [
    "a photo of a cat.", "A Photo Of A CAT!!", "a photo of the number 7", "a blurry photo of an aquarium_fish.",
    "a photo of a maple_tree, a type of object", "this is the dog's 42 toys", "  the   number\n\t7  ",
    "it's, we're, they've, i'm, you'll, he'd, don't", "café naïve façade résumé", "Hello, World! (really?)",
    "x=3.14; y=-2e10 & z<5>", "numbers 1234567890", "e-mail: someone@example.com #hashtag @user",
    "日本語のテキスト", "Ελληνικά κείμενο", "привет мир", "emoji 🐱🚀 ✓", "<|startoftext|>a cat<|endoftext|>",
    "multiple...periods!!! and ?!?!", "under_score and hyphen-ated words", "ALL CAPS SENTENCE HERE",
    "tab\tseparated\tvalues", "", "   ",
]


OPEN_CLIP_SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def open_clip_ids(st, text):
    for ours, hf in OPEN_CLIP_SPECIALS.items():
        text = text.replace(hf, ours)
    return st.encode(text)


def open_clip_tokenizer():
    """open_clip's tokenizer module, imported on its own: the package's __init__ needs torchvision, which the
    tokenizer does not (open_clip_torch is installed without its vision dependencies)."""
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
    mod_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare_ids(corpus, emt_rows, ref_rows, what):
    bad = []
    for text, got, want in zip(corpus, emt_rows, ref_rows):
        if got != want:
            i = first_diff(got, want)
            bad.append(f"{text!r}: emt {got[max(0, i - 2):i + 3]} vs {want[max(0, i - 2):i + 3]} at {i}")
    expect(not bad, f"{what}: {len(bad)} of {len(corpus)} lines differ: " + "; ".join(bad[:4]))
    return sum(map(len, ref_rows))


def train_llama_spm(path_prefix):
    """A LLaMA-style SentencePiece model (BPE, byte fallback, identity normalisation, digits split), trained by
    the sentencepiece package."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT.split("\n") * 4), model_prefix=path_prefix, vocab_size=420,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    return path_prefix + ".model"


def hf_llama_tokenizer(model_file, out_dir, legacy):
    """LlamaTokenizer built from the SentencePiece model, with <image> and <pad> added after its vocabulary as in
    llava-hf's tokenizer, saved; and the LlamaTokenizerFast transformers converts from that directory, saved."""
    from transformers import AddedToken, LlamaTokenizer, LlamaTokenizerFast
    slow = LlamaTokenizer(vocab_file=model_file, legacy=legacy)
    slow.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    slow.add_special_tokens({"pad_token": "<pad>"})
    slow.save_pretrained(out_dir + "-slow")
    fast = LlamaTokenizerFast.from_pretrained(out_dir + "-slow")
    fast.save_pretrained(out_dir + "-fast")
    expect(os.path.exists(os.path.join(out_dir + "-fast", "tokenizer.json")), "no tokenizer.json written")
    return {"slow": (slow, out_dir + "-slow"), "fast": (fast, out_dir + "-fast")}


def after_special(text, specials=("<image>", "<pad>", "<s>", "</s>")):
    """True when plain text directly follows a special token (where legacy=False drops SentencePiece's prefix)."""
    return any(s in text and not text.endswith(s) and text.split(s, 1)[1][:1] not in ("", "<")
               for s in specials)


def register(report, emt, root):
    d = os.path.join(root, "tokenizers")
    os.makedirs(d, exist_ok=True)
    corpus = os.path.join(d, "spm_corpus.json")
    write_json(corpus, SPM_CORPUS)
    state = {}

    def spm_model():
        if "model" not in state:
            state["model"] = train_llama_spm(os.path.join(d, "llama_like"))
        return state["model"]

    toks = {}

    def tokenizers(legacy):
        if legacy not in toks:
            toks[legacy] = hf_llama_tokenizer(spm_model(), os.path.join(d, f"llama-legacy{legacy}"), legacy)
        return toks[legacy]

    for kind in ("slow", "fast"):
        def check(kind=kind):
            tok, tdir = tokenizers(True)[kind]
            ref = [tok(t).input_ids for t in SPM_CORPUS]
            out = os.path.join(tdir, "emt.json")
            emt("tokenize", "spm", tdir, corpus, out)
            n = compare_ids(SPM_CORPUS, [r["ids"] for r in read_json(out)], ref, type(tok).__name__)
            state[kind] = (tdir, ref)
            return f"{len(SPM_CORPUS)} lines, {n} ids equal (<image>={tok.convert_tokens_to_ids('<image>')}, " \
                   f"<pad>={tok.pad_token_id}, byte fallback, digits split)"
        name = "LlamaTokenizer" if kind == "slow" else "LlamaTokenizerFast"
        report.run(f"tokenizer.spm[{name} legacy=True]: emt load_hf_tokenizer == transformers", check,
                   needed=kind == "slow")

    def non_legacy():
        out = []
        for kind in ("slow", "fast"):
            tok, tdir = tokenizers(False)[kind]
            ref = [tok(t).input_ids for t in SPM_CORPUS]
            res = os.path.join(tdir, "emt.json")
            emt("tokenize", "spm", tdir, corpus, res)
            got = [r["ids"] for r in read_json(res)]
            differ = [t for t, a, b in zip(SPM_CORPUS, got, ref) if a != b]
            # the fast tokenizer's Metaspace(prepend_scheme="first") also treats a leading space differently
            unexplained = [t for t in differ if not after_special(t) and not (kind == "fast" and t.startswith(" "))]
            expect(not unexplained, f"{type(tok).__name__} legacy=False differs beyond text after special tokens: "
                   f"{unexplained[:3]}")
            out.append(f"{type(tok).__name__}: {len(SPM_CORPUS) - len(differ)} lines equal, {len(differ)} differ")
        return "; ".join(out) + " (text right after a special token, where emt keeps the legacy prefix; the fast " \
            "one also at a leading space)"
    report.run("tokenizer.spm[legacy=False]: emt differs only where legacy=False drops the prefix", non_legacy)

    def spm_sensitivity():
        tdir, ref = state["slow"]
        bad = tdir + "-swapped"
        shutil.copytree(tdir, bad, dirs_exist_ok=True)
        cfg = read_json(os.path.join(bad, "tokenizer_config.json"))
        dec = cfg["added_tokens_decoder"]
        ids = [k for k, v in dec.items() if v["content"] in ("<image>", "<pad>")]
        dec[ids[0]]["content"], dec[ids[1]]["content"] = dec[ids[1]]["content"], dec[ids[0]]["content"]
        write_json(os.path.join(bad, "tokenizer_config.json"), cfg)
        if os.path.exists(os.path.join(bad, "added_tokens.json")):
            added = read_json(os.path.join(bad, "added_tokens.json"))
            added["<image>"], added["<pad>"] = added["<pad>"], added["<image>"]
            write_json(os.path.join(bad, "added_tokens.json"), added)
        out = os.path.join(bad, "emt.json")
        emt("tokenize", "spm", bad, corpus, out)
        got = [r["ids"] for r in read_json(out)]
        try:
            compare_ids(SPM_CORPUS, got, ref, "swapped")
        except Exception as e:
            return f"<image>/<pad> ids exchanged: caught ({str(e).split(':')[1].strip()})"
        raise AssertionError("exchanged added-token ids still matched")
    report.run("tokenizer.spm[sensitivity]: exchanged added-token ids are caught", spm_sensitivity)

    def clip_files():
        if "clip" not in state:
            st = open_clip_tokenizer().SimpleTokenizer()
            vocab, merges = os.path.join(d, "clip_vocab.json"), os.path.join(d, "clip_merges.txt")
            # as in HF's CLIP vocab.json: open_clip names the two specials <start_of_text> / <end_of_text>
            encoder = {OPEN_CLIP_SPECIALS.get(k, k): v for k, v in st.encoder.items()}
            write_json(vocab, encoder)
            ranked = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
            with open(merges, "w", encoding="utf-8") as f:
                f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in ranked))
            write_json(os.path.join(d, "clip_corpus.json"), CLIP_CORPUS)
            state["clip"] = (st, vocab, merges)
        return state["clip"]

    def clip_check():
        st, vocab, merges = clip_files()
        expect(len(st.encoder) == 49408, f"open_clip vocabulary has {len(st.encoder)} tokens")
        out = os.path.join(d, "clip_emt.json")
        emt("tokenize", "clip", vocab, merges, os.path.join(d, "clip_corpus.json"), out)
        got = [r["ids"] for r in read_json(out)]
        n = compare_ids(CLIP_CORPUS, got, [open_clip_ids(st, t) for t in CLIP_CORPUS], "open_clip SimpleTokenizer")
        from transformers import CLIPTokenizer
        hf = CLIPTokenizer(vocab, merges)
        compare_ids(CLIP_CORPUS, got, [hf(t, add_special_tokens=False).input_ids for t in CLIP_CORPUS],
                    "transformers CLIPTokenizer")
        return f"{len(CLIP_CORPUS)} lines, {n} ids equal to open_clip and to transformers' CLIPTokenizer"
    report.run("tokenizer.clip: emt CLIP BPE == open_clip SimpleTokenizer (bpe_simple_vocab_16e6, 49,408 tokens)",
               clip_check)

    def clip_sensitivity():
        st, vocab, merges = clip_files()
        v = read_json(vocab)
        v["cat</w>"], v["dog</w>"] = v["dog</w>"], v["cat</w>"]
        bad = os.path.join(d, "clip_vocab_swapped.json")
        write_json(bad, v)
        out = os.path.join(d, "clip_emt_swapped.json")
        emt("tokenize", "clip", bad, merges, os.path.join(d, "clip_corpus.json"), out)
        got = [r["ids"] for r in read_json(out)]
        try:
            compare_ids(CLIP_CORPUS, got, [open_clip_ids(st, t) for t in CLIP_CORPUS], "swapped")
        except Exception as e:
            return f"cat/dog ids exchanged: caught ({str(e).split(':')[1].strip()})"
        raise AssertionError("exchanged vocabulary ids still matched")
    report.run("tokenizer.clip[sensitivity]: exchanged vocabulary ids are caught", clip_sensitivity)
