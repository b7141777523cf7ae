// Conversation templates, EMT prompts, subsets, and the data loader: label masking, padding, determinism across
// worker counts, sharding, resume with skip_batches and skip_bad accounting.
#include <catch2/catch.hpp>
#include <emt/core/conversation.h>
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <emt/core/image.h>
#include <emt/core/loader.h>
#include <emt/core/runtime.h>
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <map>
#include <set>

#include "test/helpers.h"
#include "test/test_tokenizer_fake.h"

using emt::Split;

std::string data_error_of(const std::function<void()>& fn);  // test_data_formats.cpp

namespace {

// Test-only tokenizer: one id per byte (4 + byte), registered special tokens matched first.
class ByteTokenizer : public emt_test::FakeTokenizerBase {
 public:
  std::vector<int64_t> encode(const std::string& text, bool add_bos, bool add_eos) const override {
    std::vector<int64_t> ids;
    if (add_bos) ids.push_back(bos_id());
    for (size_t i = 0; i < text.size();) {
      bool matched = false;
      for (auto& [tok, id] : special_)
        if (text.compare(i, tok.size(), tok) == 0) {
          ids.push_back(id);
          i += tok.size();
          matched = true;
          break;
        }
      if (!matched) ids.push_back(4 + static_cast<unsigned char>(text[i++]));
    }
    if (add_eos) ids.push_back(eos_id());
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids, bool) const override {
    std::string s;
    for (auto id : ids)
      if (id >= 4 && id < 260) s.push_back(static_cast<char>(id - 4));
    return s;
  }
 protected:
  int64_t base_vocab() const override { return 260; }
};

std::vector<int64_t> bytes(const std::string& s) {
  std::vector<int64_t> v;
  for (unsigned char c : s) v.push_back(4 + c);
  return v;
}

// n images of 4x4 RGB whose pixels encode the index; labels i % 3 over names of different lengths.
std::shared_ptr<emt::ImageDataset> toy(int64_t n) {
  auto imgs = torch::empty({n, 4, 4, 3}, torch::kUInt8);
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < n; ++i) {
    imgs[i].fill_(static_cast<uint8_t>(i * 7 % 256));
    labels.push_back(i % 3);
  }
  return emt::make_memory_dataset(imgs, labels, {"ox", "cat", "horse"}, "toy");
}

emt::LoaderOptions small_opts() {
  emt::LoaderOptions o;
  o.batch_size = 4;
  o.image = emt::image_options_for_size(4);
  o.workers = 0;
  return o;
}

emt::PromptSpec spec() {
  emt::PromptSpec p;
  p.questions = {"Q?"};
  return p;
}

std::vector<emt::Batch> epoch_batches(emt::DataLoader& dl, int64_t epoch, int64_t skip = 0) {
  dl.start_epoch(epoch, skip);
  std::vector<emt::Batch> out;
  emt::Batch b;
  while (dl.next(b)) out.push_back(b);
  return out;
}

bool same(const emt::Batch& a, const emt::Batch& b) {
  return a.indices == b.indices && a.class_ids == b.class_ids && torch::equal(a.images, b.images) &&
         torch::equal(a.input_ids, b.input_ids) && torch::equal(a.labels, b.labels) &&
         torch::equal(a.attention_mask, b.attention_mask);
}

}  // namespace

TEST_CASE("conversation templates render LLaVA's formats", "[data]") {
  CHECK(emt::render_prompt("plain", "", "What is it?") == "<image>\nWhat is it?\n");
  CHECK(emt::render_prompt("vicuna_v1", "", "What is it?") ==
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT:");
  CHECK(emt::render_prompt("llava_v1", "SYS", "Q") == "SYS USER: <image>\nQ ASSISTANT:");
  CHECK(emt::render_prompt("llava_v0", "", "What is it?") ==
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.###Human: <image>\nWhat is it?###Assistant:");
  // A question that places <image> itself keeps it (the paper's fine-tuning question).
  CHECK(emt::render_prompt("plain", "", "What is the object in the image? <image>") ==
        "What is the object in the image? <image>\n");
  CHECK(emt::answer_suffix("vicuna_v1") == "</s>");
  CHECK(emt::answer_suffix("llava_v0") == "###");
  CHECK(emt::stop_strings("llava_v0") == std::vector<std::string>{"###"});
  CHECK_THROWS_AS(emt::render_prompt("chatml", "", "Q"), emt::ConfigError);
  CHECK_THAT(data_error_of([] { emt::conversation_template("v2"); }),
             Catch::Contains("'v2'") && Catch::Contains("plain, vicuna_v1, llava_v1, llava_v0"));
}

TEST_CASE("EMT prompts and answers follow the paper, with overrides", "[data]") {
  emt::DatasetConfig idx;
  idx.format = "idx";
  std::vector<std::string> digits = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
  CHECK(emt::dataset_question("mnist", idx, digits) ==
        "What is the number in the image? Please only answer a single number in 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.");
  emt::DatasetConfig c10;
  c10.format = "cifar10";
  CHECK(emt::dataset_question("c", c10, digits).rfind("What is the object in the image?", 0) == 0);
  CHECK(emt::dataset_question("c", c10, {"cat", "dog"}) ==
        "What is the object in the image? Please only answer a single object in cat, dog.");
  c10.prompt = "Name it ({labels}).";
  CHECK(emt::dataset_question("c", c10, {"cat", "dog"}) == "Name it (cat, dog).");
  CHECK(emt::answer_text(c10, "cat") == "The object is a(n) cat.");
  c10.answer = "It is {label}.";
  CHECK(emt::answer_text(c10, "dog") == "It is dog.");
  emt::DatasetConfig none;
  none.format = "manifest";
  CHECK_THROWS_AS(emt::dataset_question("m", none, {}), emt::ConfigError);
  CHECK((emt::builtin_dataset_names() == std::vector<std::string>{"mnist", "fashion-mnist", "shapes10", "objects60"}));
  CHECK(emt::builtin_dataset_configs().at("objects60").path == "synthetic/objects60");
}

TEST_CASE("subsets are deterministic from the seed and class-balanced on request", "[data]") {
  auto ds = toy(30);  // 10 per class
  auto a = emt::choose_subset(*ds, 7, false, 5), b = emt::choose_subset(*ds, 7, false, 5);
  CHECK(a == b);
  CHECK(a.size() == 7);
  CHECK(std::is_sorted(a.begin(), a.end()));
  CHECK(a != emt::choose_subset(*ds, 7, false, 6));
  auto bal = emt::choose_subset(*ds, 8, true, 1);
  std::vector<int> per(3);
  for (auto i : bal) ++per[ds->label(i)];
  CHECK((per == std::vector<int>{3, 3, 2}));  // remainder to the lowest class ids
  CHECK(emt::choose_subset(*ds, 0, true, 1).size() == 30);
  CHECK(emt::choose_subset(*ds, 99, false, 1).size() == 30);
  // A short class leaves its share to the others.
  auto skewed = emt::subset(ds, {0, 1, 4, 7, 10, 13, 16, 19});  // labels 0,1,1,1,1,1,1,1
  auto sb = emt::choose_subset(*skewed, 4, true, 0);
  std::vector<int> per2(3);
  for (auto i : sb) ++per2[skewed->label(i)];
  CHECK((per2 == std::vector<int>{1, 3, 0}));
  CHECK_THROWS_AS(emt::subset(ds, {30}), emt::ConfigError);
  CHECK_THROWS_AS(emt::choose_subset(*ds, -1, false, 0), emt::ConfigError);

  // Config-driven subsets: the paper scores 20% of each test set.
  emt::DatasetConfig cfg;
  cfg.format = "synthetic";
  cfg.path = "shapes10";
  cfg.test_fraction = 0.2;
  cfg.balanced = true;
  auto t1 = emt::open_dataset("shapes10", cfg, "", Split::test, 3);
  CHECK(t1->size() == 200);
  CHECK(t1->class_counts() == std::vector<int64_t>(10, 20));
  auto t2 = emt::open_dataset("shapes10", cfg, "", Split::test, 3);
  CHECK(torch::equal(t1->image(17), t2->image(17)));
  cfg.test_max_samples = 50;
  CHECK(emt::open_dataset("shapes10", cfg, "", Split::test, 3)->size() == 50);
  cfg.train_max_samples = 33;
  CHECK(emt::open_dataset("shapes10", cfg, "", Split::train, 3)->size() == 33);
}

TEST_CASE("loader masks labels on the prompt and pads right or left", "[data]") {
  auto tok = std::make_shared<ByteTokenizer>();
  auto o = small_opts();
  o.shuffle = false;
  emt::DataLoader dl(toy(5), tok, spec(), o);
  const int64_t img = dl.image_token_id();
  CHECK(img == tok->special_token_id("<image>"));
  CHECK(dl.num_batches() == 2);
  auto batches = epoch_batches(dl, 0);
  REQUIRE(batches.size() == 2);
  const auto& b = batches[0];
  CHECK((b.indices == std::vector<int64_t>{0, 1, 2, 3}));
  CHECK((b.class_ids == std::vector<int64_t>{0, 1, 2, 0}));
  CHECK(b.images.sizes() == torch::IntArrayRef({4, 3, 4, 4}));
  // plain template: bos, <image>, "\nQ?\n", then "The object is a(n) {label}." + eos.
  std::vector<int64_t> prompt = {1, img};
  for (auto v : bytes("\nQ?\n")) prompt.push_back(v);
  auto answer = [](const std::string& label) {
    auto a = bytes("The object is a(n) " + label + ".");
    a.push_back(2);
    return a;
  };
  const int64_t T = static_cast<int64_t>(prompt.size() + answer("horse").size());
  REQUIRE(b.input_ids.sizes() == torch::IntArrayRef({4, T}));
  for (int r = 0; r < 4; ++r) {
    auto ans = answer(std::vector<std::string>{"ox", "cat", "horse"}[r % 3]);
    const int64_t len = static_cast<int64_t>(prompt.size() + ans.size());
    for (int64_t j = 0; j < T; ++j) {
      const int64_t p = static_cast<int64_t>(prompt.size());
      int64_t want_id = j < p ? prompt[j] : (j < len ? ans[j - p] : 0);
      int64_t want_label = j < p || j >= len ? -100 : ans[j - p];
      CHECK(b.input_ids[r][j].item<int64_t>() == want_id);
      CHECK(b.labels[r][j].item<int64_t>() == want_label);
      CHECK(b.attention_mask[r][j].item<int64_t>() == (j < len ? 1 : 0));
    }
  }
  CHECK((b.input_ids == img).sum(1).eq(1).all().item<bool>());  // exactly one image token per row
  CHECK(batches[1].indices == std::vector<int64_t>{4});

  // Left padding for generation: prompts only, so rows are equal; use the LLaVA-JSON path for unequal prompts.
  o.padding_side = "left";
  emt::DataLoader left(toy(5), tok, spec(), o);
  auto lb = epoch_batches(left, 0)[0];
  const int64_t len0 = static_cast<int64_t>(prompt.size() + answer("ox").size());
  const int64_t pad0 = T - len0;
  CHECK(lb.input_ids[0].slice(0, 0, pad0).eq(0).all().item<bool>());
  CHECK(lb.attention_mask[0].slice(0, 0, pad0).eq(0).all().item<bool>());
  CHECK(lb.input_ids[0][pad0].item<int64_t>() == 1);
  CHECK(lb.labels[0].slice(0, 0, pad0 + static_cast<int64_t>(prompt.size())).eq(-100).all().item<bool>());
  CHECK(lb.input_ids[0][T - 1].item<int64_t>() == 2);
  CHECK(lb.input_ids[2][0].item<int64_t>() == 1);  // the longest row has no padding

  // Prompt-only batches (generation) carry no answer and no label.
  o.with_answer = false;
  emt::DataLoader gen(toy(5), tok, spec(), o);
  auto gb = epoch_batches(gen, 0)[0];
  CHECK(gb.input_ids.size(1) == static_cast<int64_t>(prompt.size()));
  CHECK(gb.labels.eq(-100).all().item<bool>());

  // llava_v0 answers end with "###" text, vicuna_v1 with eos.
  auto o2 = small_opts();
  o2.shuffle = false;
  o2.conversation = "llava_v0";
  emt::DataLoader v0(toy(1), tok, spec(), o2);
  auto vb = epoch_batches(v0, 0)[0];
  auto tail = bytes("ox.###");
  for (size_t k = 0; k < tail.size(); ++k)
    CHECK(vb.input_ids[0][vb.input_ids.size(1) - static_cast<int64_t>(tail.size() - k)].item<int64_t>() == tail[k]);
}

TEST_CASE("loader output is identical with and without worker threads", "[data]") {
  auto tok = std::make_shared<ByteTokenizer>();
  auto o = small_opts();
  o.batch_size = 3;
  o.seed = 11;
  emt::PromptSpec p;
  p.questions = {"A?", "Longer question?", "C"};
  emt::DataLoader serial(toy(23), tok, p, o);
  o.workers = 3;
  o.prefetch = 2;
  emt::DataLoader threaded(toy(23), tok, p, o);
  for (int64_t epoch : {0, 1}) {
    auto a = epoch_batches(serial, epoch), b = epoch_batches(threaded, epoch);
    REQUIRE(a.size() == b.size());
    REQUIRE(a.size() == 8);
    for (size_t k = 0; k < a.size(); ++k) CHECK(same(a[k], b[k]));
  }
  // Each epoch is a permutation; epochs differ; the same epoch repeats exactly.
  auto e0 = epoch_batches(serial, 0), e1 = epoch_batches(serial, 1), e0b = epoch_batches(serial, 0);
  std::vector<int64_t> all0, all1;
  for (auto& b : e0) all0.insert(all0.end(), b.indices.begin(), b.indices.end());
  for (auto& b : e1) all1.insert(all1.end(), b.indices.begin(), b.indices.end());
  CHECK(all0 != all1);
  std::sort(all0.begin(), all0.end());
  CHECK(all0.size() == 23);
  CHECK(std::adjacent_find(all0.begin(), all0.end()) == all0.end());
  for (size_t k = 0; k < e0.size(); ++k) CHECK(same(e0[k], e0b[k]));
  // Several questions are all used.
  std::set<int64_t> lengths;
  for (auto& b : e0)
    for (int64_t r = 0; r < b.size(); ++r) lengths.insert(b.labels[r].ne(-100).nonzero()[0].item<int64_t>());
  CHECK(lengths.size() == 3);
}

TEST_CASE("sharding covers every sample across ranks; skip_batches resumes exactly", "[data]") {
  auto tok = std::make_shared<ByteTokenizer>();
  for (bool even : {false, true}) {
    std::vector<int64_t> seen;
    std::set<int64_t> nb;
    for (int64_t r = 0; r < 3; ++r) {
      auto o = small_opts();
      o.batch_size = 2;
      o.world_size = 3;
      o.rank = r;
      o.even_shards = even;
      o.seed = 4;
      emt::DataLoader dl(toy(10), tok, spec(), o);
      nb.insert(dl.num_batches());
      for (auto& b : epoch_batches(dl, 2)) seen.insert(seen.end(), b.indices.begin(), b.indices.end());
    }
    std::sort(seen.begin(), seen.end());
    std::set<int64_t> uniq(seen.begin(), seen.end());
    CHECK(uniq.size() == 10);
    if (even) {
      CHECK(seen.size() == 12);  // padded to 3 x 4 by wrapping around
      CHECK(nb.size() == 1);
    } else {
      CHECK(seen.size() == 10);  // each sample exactly once
    }
  }
  auto o = small_opts();
  o.batch_size = 3;
  o.workers = 2;
  emt::DataLoader dl(toy(14), tok, spec(), o);
  auto full = epoch_batches(dl, 5);
  auto resumed = epoch_batches(dl, 5, 2);
  REQUIRE(full.size() == 5);
  REQUIRE(resumed.size() == 3);
  for (size_t k = 0; k < 3; ++k) CHECK(same(resumed[k], full[k + 2]));
  CHECK(epoch_batches(dl, 5, 5).empty());
  CHECK_THROWS_AS(dl.start_epoch(5, 6), emt::ConfigError);
  o.drop_last = true;
  emt::DataLoader dropped(toy(14), tok, spec(), o);
  CHECK(dropped.num_batches() == 4);
}

TEST_CASE("loader skips bad images only when asked, counting them", "[data]") {
  const std::string dir = emt_test::scratch_dir("data_loader_bad");
  for (int i = 0; i < 4; ++i)
    emt::write_png(dir + "/a/" + std::to_string(i) + ".png", torch::full({4, 4, 3}, 10 * i, torch::kUInt8));
  emt::write_file_atomic(dir + "/a/1.png", "garbage");
  auto ds = emt::open_image_folder(dir, Split::train, "");  // 4 files, none held out (index 5 never reached)
  REQUIRE(ds->size() == 4);
  auto tok = std::make_shared<ByteTokenizer>();
  auto o = small_opts();
  o.shuffle = false;
  o.batch_size = 2;
  for (int workers : {0, 2}) {
    o.workers = workers;
    o.skip_bad = false;
    emt::DataLoader strict(ds, tok, spec(), o);
    emt::Batch b;
    CHECK_THAT(data_error_of([&] { strict.next(b); }), Catch::Contains("a/1.png"));
    o.skip_bad = true;
    emt::DataLoader lenient(ds, tok, spec(), o);
    auto batches = epoch_batches(lenient, 0);
    REQUIRE(batches.size() == 2);
    CHECK(batches[0].indices == std::vector<int64_t>{0});
    CHECK((batches[1].indices == std::vector<int64_t>{2, 3}));
    CHECK(lenient.skipped_bad() == 1);
  }
}

TEST_CASE("loader validates its options and handles instruction data", "[data]") {
  auto tok = std::make_shared<ByteTokenizer>();
  auto bad = [&](auto mutate) {
    auto o = small_opts();
    mutate(o);
    return data_error_of([&] { emt::DataLoader dl(toy(3), tok, spec(), o); });
  };
  CHECK_THAT(bad([](emt::LoaderOptions& o) { o.batch_size = 0; }), Catch::Contains("batch_size"));
  CHECK_THAT(bad([](emt::LoaderOptions& o) { o.rank = 2, o.world_size = 2; }), Catch::Contains("rank 2"));
  CHECK_THAT(bad([](emt::LoaderOptions& o) { o.padding_side = "middle"; }), Catch::Contains("padding_side"));
  CHECK_THAT(bad([](emt::LoaderOptions& o) { o.conversation = "nope"; }), Catch::Contains("unknown template"));
  CHECK_THAT(bad([](emt::LoaderOptions& o) { o.workers = -1; }), Catch::Contains("workers"));
  CHECK_THAT(data_error_of([&] { emt::DataLoader dl(toy(3), tok, emt::PromptSpec{}, small_opts()); }),
             Catch::Contains("questions is empty"));
  emt::PromptSpec two;
  two.questions = {"<image> and <image>"};
  CHECK_THAT(data_error_of([&] { emt::DataLoader dl(toy(3), tok, two, small_opts()); }),
             Catch::Contains("exactly one <image>"));

  // LLaVA JSON: each sample brings its own question and answer.
  const std::string dir = emt_test::scratch_dir("data_loader_llava");
  emt::write_png(dir + "/x.png", torch::zeros({4, 4, 3}, torch::kUInt8));
  emt::write_file_atomic(dir + "/d.json", R"([
    {"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]},
    {"image": "x.png", "conversations": [{"from": "human", "value": "Long question\n<image>"},
                                         {"from": "gpt", "value": "A"}]}])");
  auto o = small_opts();
  o.shuffle = false;
  emt::DataLoader dl(emt::open_llava_dataset(dir + "/d.json", Split::train), tok, emt::PromptSpec{}, o);
  auto b = epoch_batches(dl, 0).at(0);
  CHECK((b.class_ids == std::vector<int64_t>{-1, -1}));
  auto row0 = b.input_ids[0];
  std::vector<int64_t> want = {1, dl.image_token_id()};
  for (auto v : bytes("\nHi\nYo")) want.push_back(v);
  want.push_back(2);
  for (size_t j = 0; j < want.size(); ++j) CHECK(row0[j].item<int64_t>() == want[j]);
  CHECK(b.labels[0].ne(-100).sum().item<int64_t>() == 3);  // "Yo" + eos
  CHECK(b.labels[1].ne(-100).sum().item<int64_t>() == 2);  // "A" + eos
}
