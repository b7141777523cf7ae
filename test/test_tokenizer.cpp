// Tokenizers: SentencePiece through the plug-in in the same process as LibTorch (training, round trips,
// special tokens, HF added tokens, errors) and CLIP's byte-level BPE against the ids transformers' CLIPTokenizer
// gives on the same files (scripts/fixtures/make_clip_bpe_fixture.py; scripts/interop.sh checks the real vocabulary).
#include <emt/core/error.h>
#include <emt/core/tokenizer.h>
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <unistd.h>
#include <filesystem>
#include <fstream>
#include <random>

#include "test/expect_error.h"
#include "test/helpers.h"

using emt_test::spit;

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using emt_test::error_of;

namespace {

const std::vector<std::string> kLabels = {"airplane", "automobile", "bird",  "cat",   "deer",  "dog",
                                          "frog",     "horse",      "ship",  "truck", "apple", "orange",
                                          "elephant", "umbrella",   "house", "otter"};

// 2000 lines in the style of the paper's prompts and answers.
std::string write_corpus(const std::string& dir) {
  const std::string path = dir + "/corpus.txt";
  std::ofstream f(path);
  for (int i = 0; i < 2000; ++i) {
    const std::string& label = kLabels[(i / 4) % kLabels.size()];
    switch (i % 4) {
      case 0: f << "The object is a(n) " << label << ".\n"; break;
      case 1:
        f << "What is the number in the image? Please only answer a single number in 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.\n";
        break;
      case 2: f << "What is the object in the image? <image>\n"; break;
      default: f << "The number is " << (i % 10) << ". It is not a " << label << ".\n"; break;
    }
  }
  return path;
}

emt::SentencePieceTrainOptions train_opts() {
  emt::SentencePieceTrainOptions o;
  o.vocab_size = 200;
  o.model_type = "bpe";
  o.user_defined_symbols = {"<image>"};
  return o;
}

// One trained model shared by the tests in this file (training is deterministic, so sharing hides nothing).
const std::string& trained_spm_model() {
  // One model per test process: CTest runs the test cases of this file in parallel processes, which must not
  // retrain (and truncate) a model another one is reading.
  static const std::string path = [] {
    const std::string dir = emt_test::scratch_dir("tok_trained_" + std::to_string(::getpid()));
    emt::train_sentencepiece(write_corpus(dir), dir + "/spm", train_opts());
    return dir + "/spm.model";
  }();
  return path;
}

const std::vector<std::string> kSentences = {
    "The object is a(n) horse.",
    "What is the number in the image? Please only answer a single number in 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.",
    "The number is 7.",
    "It is not a frog. The object is a(n) truck.",
};

}  // namespace

TEST_CASE("sentencepiece trains and round trips in the same process as LibTorch", "[tokenizer]") {
  // A LibTorch op before and after the plug-in is used: both libraries' protobufs coexist.
  torch::Tensor x = torch::arange(16, torch::kFloat32).reshape({4, 4});
  CHECK(torch::equal(torch::mm(x, torch::eye(4)), x));

  auto tok = emt::load_sentencepiece(trained_spm_model());
  CHECK(tok->vocab_size() == 200);
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);
  CHECK(tok->pad_id() == 0);  // no <pad> piece: falls back to unk

  for (const auto& s : kSentences) {
    INFO(s);
    auto ids = tok->encode(s);
    CHECK(!ids.empty());
    CHECK(ids.size() < s.size());  // merges happened
    for (auto id : ids) CHECK((id >= 0 && id < tok->vocab_size()));
    CHECK(tok->decode(ids) == s);
    auto framed = tok->encode(s, true, true);
    CHECK(framed.front() == 1);
    CHECK(framed.back() == 2);
    CHECK(std::vector<int64_t>(framed.begin() + 1, framed.end() - 1) == ids);
    CHECK(tok->decode(framed) == s);
    CHECK(tok->decode(framed, /*skip_special=*/false) == "<s>" + s + "</s>");
  }
  CHECK(torch::mm(x, x).sum().item<float>() == Approx(3920.0f));
}

TEST_CASE("sentencepiece special tokens map to one id and round trip", "[tokenizer]") {
  auto tok = emt::load_sentencepiece(trained_spm_model());
  const int64_t image = tok->add_special_token("<image>");  // a user-defined symbol of the model
  CHECK(image > 2);
  CHECK(image < 200);
  CHECK(tok->special_token_id("<image>") == image);
  CHECK(tok->vocab_size() == 200);

  const std::string text = "What is the object in the image? <image> The object is a(n) cat.";
  auto ids = tok->encode(text);
  CHECK(std::count(ids.begin(), ids.end(), image) == 1);
  CHECK(tok->decode(ids, false) == text);
  CHECK(tok->decode(ids, true) == "What is the object in the image?  The object is a(n) cat.");

  // A token the model does not know gets the next free id and is split out before encoding.
  const int64_t video = tok->add_special_token("<video>");
  CHECK(video == 200);
  CHECK(tok->vocab_size() == 201);
  CHECK(tok->add_special_token("<video>") == video);
  auto v = tok->encode("<video><image> The number is 3.<video>");
  CHECK(v[0] == video);
  CHECK(v[1] == image);
  CHECK(v.back() == video);
  CHECK(std::count(v.begin(), v.end(), video) == 2);
  CHECK(tok->decode(v, false) == "<video><image> The number is 3.<video>");
  CHECK(tok->decode(v, true) == " The number is 3.");

  const int64_t pad = tok->add_special_token("<pad>");
  CHECK(pad == 201);
  CHECK(tok->pad_id() == pad);
  CHECK(tok->special_token_id("<nothing>") == -1);

  CHECK_THAT(error_of<emt::FormatError>([&] { tok->decode({5, 9999}); }), Contains("9999"));
  CHECK_THROWS_AS(tok->decode({-1}), emt::FormatError);
}

TEST_CASE("sentencepiece training is deterministic", "[tokenizer]") {
  const std::string dir = emt_test::scratch_dir("tok_determinism");
  const std::string corpus = write_corpus(dir);
  emt::train_sentencepiece(corpus, dir + "/a", train_opts());
  emt::train_sentencepiece(corpus, dir + "/b", train_opts());
  auto a = emt::load_sentencepiece(dir + "/a.model");
  auto b = emt::load_sentencepiece(dir + "/b.model");
  auto ref = emt::load_sentencepiece(trained_spm_model());
  REQUIRE(a->vocab_size() == b->vocab_size());
  for (const auto& s : kSentences) {
    CHECK(a->encode(s) == b->encode(s));
    CHECK(a->encode(s) == ref->encode(s));
  }
  for (int64_t id = 3; id < a->vocab_size(); ++id) {
    INFO(id);
    CHECK(a->decode({id}) == b->decode({id}));
  }
}

TEST_CASE("sentencepiece load and train errors name the path", "[tokenizer]") {
  const std::string dir = emt_test::scratch_dir("tok_errors");
  const std::string missing = dir + "/missing.model";
  CHECK_THAT(error_of<emt::IoError>([&] { emt::load_sentencepiece(missing); }), Contains(missing));

  const std::string corrupt = dir + "/corrupt.model";
  std::mt19937 rng(7);
  std::string junk(4096, '\0');
  for (auto& c : junk) c = static_cast<char>(rng() & 0xff);
  junk[0] = '\xff';
  spit(corrupt, junk);
  CHECK_THAT(error_of<emt::IoError>([&] { emt::load_sentencepiece(corrupt); }), Contains(corrupt));
  spit(corrupt, "");
  CHECK_THAT(error_of<emt::IoError>([&] { emt::load_sentencepiece(corrupt); }), Contains(corrupt));

  CHECK_THAT(error_of<emt::IoError>([&] { emt::train_sentencepiece(dir + "/nocorpus.txt", dir + "/m", train_opts()); }),
             Contains("nocorpus.txt"));
  auto bad = train_opts();
  bad.model_type = "wordpiece";
  CHECK_THROWS_AS(emt::train_sentencepiece(write_corpus(dir), dir + "/m", bad), emt::ConfigError);
  bad = train_opts();
  bad.user_defined_symbols = {"a,b"};
  CHECK_THROWS_AS(emt::train_sentencepiece(write_corpus(dir), dir + "/m", bad), emt::ConfigError);
  bad = train_opts();
  bad.vocab_size = 100000;  // more pieces than the corpus can give
  CHECK_THAT(error_of<emt::ConfigError>([&] { emt::train_sentencepiece(write_corpus(dir), dir + "/m", bad); }),
             Contains("corpus.txt"));
}

TEST_CASE("load_hf_tokenizer: the original LLaVA's <im_patch> stands for <image>", "[tokenizer]") {
  const std::string dir = emt_test::scratch_dir("tok_llava_v0");
  fs::copy_file(trained_spm_model(), dir + "/tokenizer.model");
  spit(dir + "/added_tokens.json", R"({"<im_patch>": 200, "<im_start>": 201, "<im_end>": 202})");
  auto tok = emt::load_hf_tokenizer(dir);
  CHECK(tok->special_token_id("<image>") == 200);
  CHECK(tok->special_token_id("<im_start>") == 201);
  auto ids = tok->encode("<image>\nWhat is it?", false, false);
  CHECK(ids.front() == 200);
  CHECK(tok->decode({200}, false) == "<im_patch>");  // the id keeps its own text
  // A folder that has its own <image> keeps it.
  spit(dir + "/added_tokens.json", R"({"<im_patch>": 200, "<image>": 203})");
  CHECK(emt::load_hf_tokenizer(dir)->special_token_id("<image>") == 203);
}

TEST_CASE("load_hf_tokenizer honours added token ids", "[tokenizer]") {
  const std::string dir = emt_test::scratch_dir("tok_hf");
  fs::copy_file(trained_spm_model(), dir + "/tokenizer.model");
  // LLaVA-1.5 style: ids right after the model's vocabulary, given in two files.
  spit(dir + "/added_tokens.json", R"({"<img>": 200, "<pad>": 201})");
  spit(dir + "/tokenizer_config.json", R"({"add_bos_token": true, "added_tokens_decoder": {
        "0": {"content": "<unk>", "special": true}, "1": {"content": "<s>", "special": true},
        "2": {"content": "</s>", "special": true}, "200": {"content": "<img>", "special": true}}})");
  auto tok = emt::load_hf_tokenizer(dir);
  CHECK(tok->special_token_id("<img>") == 200);
  CHECK(tok->special_token_id("<pad>") == 201);
  CHECK(tok->pad_id() == 201);
  CHECK(tok->vocab_size() == 202);
  auto ids = tok->encode("<s><img> The number is 4.", false, true);
  CHECK(ids[0] == 1);
  CHECK(ids[1] == 200);
  CHECK(ids.back() == 2);
  CHECK(tok->decode(ids, false) == "<s><img> The number is 4.</s>");
  CHECK(tok->decode(ids, true) == " The number is 4.");
  CHECK(tok->add_special_token("<extra>") == 202);

  SECTION("an id that contradicts the model is rejected, naming the file") {
    spit(dir + "/tokenizer_config.json", R"({"added_tokens_decoder": {"5": {"content": "<img>"}}})");
    CHECK_THAT(error_of<emt::FormatError>([&] { emt::load_hf_tokenizer(dir); }),
               Contains("tokenizer_config.json") && Contains("<img>"));
  }
  SECTION("the two files disagree") {
    spit(dir + "/tokenizer_config.json", R"({"added_tokens_decoder": {"203": {"content": "<img>"}}})");
    CHECK_THAT(error_of<emt::FormatError>([&] { emt::load_hf_tokenizer(dir); }),
               Contains("added_tokens.json") && Contains("<img>"));
  }
  SECTION("malformed files") {
    spit(dir + "/added_tokens.json", "[1, 2");
    CHECK_THAT(error_of<emt::FormatError>([&] { emt::load_hf_tokenizer(dir); }), Contains("added_tokens.json"));
    spit(dir + "/added_tokens.json", R"({"<x>": "two hundred"})");
    CHECK_THAT(error_of<emt::FormatError>([&] { emt::load_hf_tokenizer(dir); }), Contains("<x>"));
    spit(dir + "/added_tokens.json", "{}");
    spit(dir + "/tokenizer_config.json", R"({"added_tokens_decoder": {"abc": {"content": "<q>"}}})");
    CHECK_THAT(error_of<emt::FormatError>([&] { emt::load_hf_tokenizer(dir); }), Contains("tokenizer_config.json"));
  }
  SECTION("no tokenizer.model") {
    fs::remove(dir + "/tokenizer.model");
    CHECK_THAT(error_of<emt::IoError>([&] { emt::load_hf_tokenizer(dir); }), Contains(dir + "/tokenizer.model"));
  }
}

TEST_CASE("CLIP byte-level BPE matches transformers' CLIPTokenizer on a tiny vocabulary", "[tokenizer]") {
  const std::string fx = std::string(EMT_SOURCE_DIR) + "/test/fixtures/tokenizer/";
  auto tok = emt::load_clip_bpe(fx + "clip_vocab.json", fx + "clip_merges.txt");
  CHECK(tok->vocab_size() == 533);
  CHECK(tok->bos_id() == 531);
  CHECK(tok->eos_id() == 532);
  CHECK(tok->pad_id() == 532);

  // Expected ids printed by scripts/fixtures/make_clip_bpe_fixture.py. By hand: "a</w>" = 256 + ('a' - '!') = 320;
  // merges start at 512 ("he</w>"), so "photo</w>" = 517, "cat</w>" = 520, "th" = 525 (ranked after "is</w>").
  using V = std::vector<int64_t>;
  CHECK(tok->encode("a photo of a cat") == V{320, 517, 518, 320, 520});
  CHECK(tok->encode("A Photo of a CAT!!") == V{320, 517, 518, 320, 520, 0, 256});
  CHECK(tok->encode("this is the dog's 42 toys") == V{525, 524, 524, 513, 522, 523, 275, 273, 83, 78, 88, 338});
  CHECK(tok->encode("  the   number\n\t7  ") == V{513, 530, 278});
  CHECK(tok->encode("caf\xc3\xa9") == V{519, 69, 127, 358});
  CHECK(tok->encode("<|startoftext|>a cat<|endoftext|>") == V{531, 320, 520, 532});
  CHECK(tok->encode("a cat", true, true) == V{531, 320, 520, 532});

  CHECK(tok->decode({320, 517, 518, 320, 520}) == "a photo of a cat");
  CHECK(tok->decode(tok->encode("A Photo of a CAT!!")) == "a photo of a cat !!");  // "cat</w>" ends a word
  CHECK(tok->decode(tok->encode("caf\xc3\xa9")) == "caf\xc3\xa9");
  CHECK(tok->decode(tok->encode("this is the dog's 42 toys")) == "this is the dog 's 4 2 toys");
  CHECK(tok->decode({531, 320, 520, 532}) == "a cat");
  CHECK(tok->decode({531, 320, 520, 532}, false) == "<|startoftext|>a cat <|endoftext|>");
  CHECK_THROWS_AS(tok->decode({533}), emt::FormatError);

  const int64_t extra = tok->add_special_token("<image>");
  CHECK(extra == 533);
  CHECK(tok->encode("a <image> cat") == V{320, 533, 520});
}

TEST_CASE("CLIP BPE file errors name the file", "[tokenizer]") {
  const std::string dir = emt_test::scratch_dir("tok_clip_errors");
  const std::string fx = std::string(EMT_SOURCE_DIR) + "/test/fixtures/tokenizer/";
  CHECK_THAT(error_of<emt::IoError>([&] { emt::load_clip_bpe(dir + "/none.json", fx + "clip_merges.txt"); }),
             Contains("none.json"));
  spit(dir + "/merges.txt", "#version: 0.2\nh e</w>\nonlyone\n");
  CHECK_THAT(error_of<emt::FormatError>([&] { emt::load_clip_bpe(fx + "clip_vocab.json", dir + "/merges.txt"); }),
             Contains("merges.txt:3"));
  spit(dir + "/vocab.json", R"({"a": 0, "b": -1})");
  CHECK_THAT(error_of<emt::FormatError>([&] { emt::load_clip_bpe(dir + "/vocab.json", fx + "clip_merges.txt"); }),
             Contains("vocab.json") && Contains("'b'"));
}

TEST_CASE("sentencepiece training honours the special ids it is given", "[tokenizer]") {
  const std::string dir = emt_test::scratch_dir("tok_special_ids");
  auto o = train_opts();
  o.unk_id = 0;
  o.bos_id = 1;
  o.eos_id = 3;
  o.pad_id = 2;
  emt::train_sentencepiece(write_corpus(dir), dir + "/ids", o);
  auto tok = emt::load_sentencepiece(dir + "/ids.model");
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 3);
  CHECK(tok->pad_id() == 2);
  auto ids = tok->encode("The number is 5.", true, true);
  CHECK(ids.front() == 1);
  CHECK(ids.back() == 3);
  ids.push_back(2);
  CHECK(tok->decode(ids) == "The number is 5.");
  CHECK(tok->decode(ids, false) == "<s>The number is 5.</s><pad>");
}
