// safetensors: golden file byte compatibility, dtype round trips, sharded checkpoints, and one throw test per
// validation rule of the header parser.
#include <emt/core/error.h>
#include <emt/core/safetensors.h>
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "test/expect_error.h"
#include "test/helpers.h"

using emt_test::slurp;
using emt_test::spit;

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using emt_test::error_of;

namespace {

std::string u64le(uint64_t v) {
  std::string s;
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  return s;
}

// A file image with a given header text, header length field (default: the real one) and data size.
std::string image(const std::string& header, uint64_t data_bytes, int64_t claimed_len = -1) {
  return u64le(claimed_len < 0 ? header.size() : static_cast<uint64_t>(claimed_len)) + header +
         std::string(data_bytes, '\0');
}

std::string format_error_for(const std::string& dir, const std::string& file, const std::string& bytes) {
  const std::string p = dir + "/" + file;
  spit(p, bytes);
  return error_of<emt::FormatError>([&] { emt::SafetensorsReader r(p); });
}

// Mirrors golden_tensors() in scripts/fixtures/make_safetensors_fixture.py.
emt::NamedTensors golden_tensors() {
  return {
      {"w", (torch::arange(6, torch::kFloat32) * 0.5 - 1.0).reshape({2, 3})},
      {"b", torch::tensor({1.5, -2.0, 0.15625}).to(torch::kBFloat16)},
      {"h", torch::tensor({0.25, -8.0, 1024.0, 0.0}).reshape({2, 2}).to(torch::kHalf)},
      {"ids", torch::tensor({int64_t(-1), int64_t(0), int64_t(1) << 40}, torch::kInt64)},
      {"mask", torch::tensor({1, 0, 1, 1}).to(torch::kBool)},
      {"u", torch::tensor({0, 255}).to(torch::kUInt8)},
      {"i8", torch::tensor({-128, 127}).to(torch::kInt8)},
      {"i16", torch::tensor({-32768, 12345}).to(torch::kInt16)},
      {"i32", torch::tensor({-7, 1 << 30}).to(torch::kInt32)},
      {"d", torch::tensor({3.25}, torch::kFloat64)},
      {"empty", torch::zeros({0, 3}, torch::kFloat32)},
  };
}

const std::string kGolden = std::string(EMT_SOURCE_DIR) + "/test/fixtures/safetensors/golden.safetensors";

}  // namespace

TEST_CASE("safetensors reads the golden reference file exactly", "[safetensors]") {
  emt::SafetensorsReader r(kGolden);
  CHECK(r.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  // The reference order: descending dtype alignment, then name.
  CHECK(r.names() == std::vector<std::string>{"ids", "d", "empty", "w", "i32", "b", "h", "i16", "i8", "u", "mask"});
  CHECK(r.info("w").dtype == "F32");
  CHECK(r.info("w").shape == std::vector<int64_t>{2, 3});
  CHECK(r.info("w").begin == 32);
  CHECK(r.info("w").end == 56);
  for (const auto& [name, want] : golden_tensors()) {
    INFO(name);
    torch::Tensor got = r.load(name);
    CHECK(got.scalar_type() == want.scalar_type());
    CHECK(got.sizes() == want.sizes());
    CHECK(torch::equal(got, want));
  }
  CHECK(r.load("b").scalar_type() == torch::kBFloat16);
  CHECK(r.load("mask").scalar_type() == torch::kBool);
  CHECK(r.load("ids")[2].item<int64_t>() == (int64_t(1) << 40));
}

TEST_CASE("safetensors writer is byte-identical to the safetensors library", "[safetensors]") {
  const std::string dir = emt_test::scratch_dir("st_golden");
  const std::string out = dir + "/golden.safetensors";
  emt::save_safetensors(out, golden_tensors(), {{"format", "pt"}});
  const std::string want = slurp(kGolden), got = slurp(out);
  REQUIRE(want.size() == 754);
  CHECK(got.size() == want.size());
  CHECK(got == want);
  // Caller order does not matter: the writer sorts like the reference.
  auto reversed = golden_tensors();
  std::reverse(reversed.begin(), reversed.end());
  emt::save_safetensors(out, reversed, {{"format", "pt"}});
  CHECK(slurp(out) == want);
  // Without metadata there is no "__metadata__" key, and the header stays 8-byte aligned.
  emt::save_safetensors(out, {{"x", torch::ones({1})}});
  const std::string plain = slurp(out);
  CHECK(plain.find("__metadata__") == std::string::npos);
  uint64_t n = 0;
  std::memcpy(&n, plain.data(), 8);
  CHECK(n % 8 == 0);
  CHECK(plain.substr(8, n) == std::string("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}") +
                                  std::string(n - 54, ' '));
}

TEST_CASE("safetensors round trips every dtype exactly", "[safetensors]") {
  const std::string dir = emt_test::scratch_dir("st_roundtrip");
  torch::manual_seed(3);
  torch::Tensor base = torch::randn({3, 5}) * 100;
  emt::NamedTensors ts = {
      {"f32", base},
      {"f16", base.to(torch::kHalf)},
      {"bf16", base.to(torch::kBFloat16)},
      {"f64", base.to(torch::kDouble) / 7},
      {"i64", torch::randint(-(int64_t(1) << 50), int64_t(1) << 50, {4}, torch::kInt64)},
      {"i32", torch::randint(-100000, 100000, {2, 2}, torch::kInt32)},
      {"i16", torch::randint(-30000, 30000, {7}, torch::kInt16)},
      {"i8", torch::randint(-128, 128, {9}, torch::kInt8)},
      {"u8", torch::randint(0, 256, {1, 1, 3}, torch::kUInt8)},
      {"bool", torch::rand({11}) > 0.5},
      {"scalar", torch::tensor(2.5)},
      {"empty", torch::zeros({4, 0, 2}, torch::kBFloat16)},
      {"transposed", base.t()},  // non-contiguous input
  };
  emt::save_safetensors(dir + "/all.safetensors", ts, {{"a", "1"}, {"b", "x y"}});
  emt::SafetensorsReader r(dir + "/all.safetensors");
  CHECK(r.metadata() == std::map<std::string, std::string>{{"a", "1"}, {"b", "x y"}});
  CHECK(r.names().size() == ts.size());
  for (const auto& [name, want] : ts) {
    INFO(name);
    torch::Tensor got = r.load(name);
    CHECK(got.scalar_type() == want.scalar_type());
    CHECK(got.sizes() == want.sizes());
    CHECK(got.is_contiguous());
    CHECK(torch::equal(got, want));
  }
  CHECK(r.info("scalar").shape.empty());
  CHECK(r.info("empty").begin == r.info("empty").end);
  CHECK(r.info("bf16").dtype == "BF16");
  CHECK(r.info("bool").dtype == "BOOL");
  // Every tensor starts at a multiple of its element size, as the reference ordering guarantees.
  for (const auto& n : r.names()) {
    INFO(n);
    CHECK(r.info(n).begin % r.load(n).element_size() == 0);
  }
}

TEST_CASE("safetensors writer rejects what it cannot store", "[safetensors]") {
  const std::string dir = emt_test::scratch_dir("st_write_errors");
  const std::string p = dir + "/x.safetensors";
  auto msg = error_of<emt::FormatError>([&] { emt::save_safetensors(p, {{"a", torch::ones(1)}, {"a", torch::ones(1)}}); });
  CHECK_THAT(msg, Contains("x.safetensors") && Contains("'a'") && Contains("twice"));
  msg = error_of<emt::FormatError>(
      [&] { emt::save_safetensors(p, {{"c", torch::ones(2, torch::TensorOptions().dtype(torch::kComplexFloat))}}); });
  CHECK_THAT(msg, Contains("x.safetensors") && Contains("'c'"));
  msg = error_of<emt::FormatError>([&] { emt::save_safetensors(p, {{"__metadata__", torch::ones(1)}}); });
  CHECK_THAT(msg, Contains("reserved"));
  CHECK_FALSE(fs::exists(p));
}

TEST_CASE("safetensors checkpoints shard into three files with an index", "[safetensors]") {
  const std::string dir = emt_test::scratch_dir("st_shards");
  emt::NamedTensors ts;
  for (int i = 0; i < 6; ++i)
    ts.push_back({"layer." + std::to_string(i) + ".weight", torch::full({25}, float(i))});  // 100 bytes each
  emt::save_checkpoint(dir, ts, /*max_shard_bytes=*/200);
  for (const char* f : {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                        "model-00003-of-00003.safetensors", "model.safetensors.index.json"})
    CHECK(fs::exists(dir + "/" + f));
  CHECK_FALSE(fs::exists(dir + "/model.safetensors"));

  auto index = nlohmann::json::parse(slurp(dir + "/model.safetensors.index.json"));
  CHECK(index["metadata"]["total_size"] == 600);
  CHECK(index["weight_map"].size() == 6);
  CHECK(index["weight_map"]["layer.0.weight"] == "model-00001-of-00003.safetensors");
  CHECK(index["weight_map"]["layer.3.weight"] == "model-00002-of-00003.safetensors");
  CHECK(index["weight_map"]["layer.5.weight"] == "model-00003-of-00003.safetensors");
  CHECK(emt::SafetensorsReader(dir + "/model-00002-of-00003.safetensors").metadata().at("format") == "pt");

  for (const std::string& src : {dir, dir + "/model.safetensors.index.json"}) {
    emt::CheckpointReader ck(src);
    CHECK(ck.names().size() == 6);
    for (const auto& [name, want] : ts) {
      INFO(name);
      CHECK(ck.contains(name));
      CHECK(torch::equal(ck.load(name), want));
    }
    CHECK_THAT(ck.file_of("layer.4.weight"), Contains("model-00003-of-00003.safetensors"));
    CHECK(ck.info("layer.1.weight").shape == std::vector<int64_t>{25});
    CHECK_FALSE(ck.contains("nope"));
    CHECK_THAT(error_of<emt::FormatError>([&] { ck.load("nope"); }), Contains("'nope'"));
  }

  // Re-saving below the limit leaves one file and removes the old shards and index.
  emt::save_checkpoint(dir, ts);
  CHECK(fs::exists(dir + "/model.safetensors"));
  CHECK_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  CHECK_FALSE(fs::exists(dir + "/model-00001-of-00003.safetensors"));
  emt::CheckpointReader single(dir);
  CHECK(torch::equal(single.load("layer.5.weight"), ts[5].second));
  emt::CheckpointReader by_file(dir + "/model.safetensors");
  CHECK(by_file.names().size() == 6);
}

TEST_CASE("safetensors index validation names the index file", "[safetensors]") {
  const std::string dir = emt_test::scratch_dir("st_index_errors");
  emt::save_checkpoint(dir, {{"a", torch::ones(4)}, {"b", torch::ones(4)}, {"c", torch::ones(4)}}, 16);
  const std::string idx = dir + "/model.safetensors.index.json";
  REQUIRE(fs::exists(idx));
  const std::string good = slurp(idx);
  auto j = nlohmann::json::parse(good);

  j["weight_map"]["a"] = "model-00009-of-00009.safetensors";
  spit(idx, j.dump());
  auto msg = error_of<emt::IoError>([&] { emt::CheckpointReader c(dir); });
  CHECK_THAT(msg, Contains("model.safetensors.index.json") && Contains("model-00009-of-00009") && Contains("'a'"));

  j = nlohmann::json::parse(good);
  j["weight_map"]["zz"] = "model-00001-of-00003.safetensors";
  spit(idx, j.dump());
  msg = error_of<emt::FormatError>([&] { emt::CheckpointReader c(dir); });
  CHECK_THAT(msg, Contains("model.safetensors.index.json") && Contains("'zz'"));

  j = nlohmann::json::parse(good);
  j["weight_map"]["a"] = "../elsewhere.safetensors";
  spit(idx, j.dump());
  CHECK_THAT(error_of<emt::FormatError>([&] { emt::CheckpointReader c(dir); }), Contains("model.safetensors.index.json"));

  spit(idx, "{\"weight_map\": [1, 2]}");
  CHECK_THAT(error_of<emt::FormatError>([&] { emt::CheckpointReader c(dir); }), Contains("weight_map"));
  spit(idx, "not json");
  CHECK_THAT(error_of<emt::FormatError>([&] { emt::CheckpointReader c(dir); }), Contains("model.safetensors.index.json"));

  const std::string empty = emt_test::scratch_dir("st_index_empty");
  CHECK_THAT(error_of<emt::IoError>([&] { emt::CheckpointReader c(empty); }), Contains("st_index_empty"));
}

TEST_CASE("safetensors header validation rejects every malformed file", "[safetensors]") {
  const std::string dir = emt_test::scratch_dir("st_errors");
  auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape, uint64_t b,
                  uint64_t e) {
    return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
           std::to_string(b) + "," + std::to_string(e) + "]}";
  };

  SECTION("missing file is an IoError") {
    CHECK_THAT(error_of<emt::IoError>([&] { emt::SafetensorsReader r(dir + "/absent.safetensors"); }),
               Contains("absent.safetensors"));
  }
  SECTION("file shorter than the length field") {
    CHECK_THAT(format_error_for(dir, "tiny.safetensors", "abc"), Contains("tiny.safetensors") && Contains("3 bytes"));
  }
  SECTION("truncated data") {
    const std::string g = slurp(kGolden);
    CHECK_THAT(format_error_for(dir, "cut.safetensors", g.substr(0, g.size() - 2)),
               Contains("cut.safetensors") && Contains("tensor 'mask'"));
  }
  SECTION("header length larger than the file") {
    CHECK_THAT(format_error_for(dir, "long.safetensors", image("{}", 0, 4096)),
               Contains("long.safetensors") && Contains("header length 4096"));
  }
  SECTION("header length above 100 MB never allocates") {
    CHECK_THAT(format_error_for(dir, "huge.safetensors", image("{}", 0, int64_t(1) << 62)),
               Contains("huge.safetensors") && Contains("100 MB"));
  }
  SECTION("shape and byte size disagree") {
    CHECK_THAT(format_error_for(dir, "a.safetensors", image("{" + entry("w", "F32", "[2,3]", 0, 16) + "}", 16)),
               Contains("[safetensors]") && Contains("a.safetensors") &&
                   Contains("tensor 'w' needs 24 bytes, data_offsets span 16"));
  }
  SECTION("overlapping tensors") {
    auto h = "{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 4, 12) + "}";
    CHECK_THAT(format_error_for(dir, "ov.safetensors", image(h, 12)),
               Contains("ov.safetensors") && Contains("'b'") && Contains("overlaps") && Contains("'a'"));
  }
  SECTION("unsupported dtype is named") {
    CHECK_THAT(format_error_for(dir, "dt.safetensors", image("{" + entry("z", "C64", "[1]", 0, 8) + "}", 8)),
               Contains("dt.safetensors") && Contains("'z'") && Contains("'C64'"));
  }
  SECTION("header that is not a JSON object") {
    CHECK_THAT(format_error_for(dir, "arr.safetensors", image("[1,2,3]", 0)),
               Contains("arr.safetensors") && Contains("not a JSON object"));
    CHECK_THAT(format_error_for(dir, "junk.safetensors", image("{\"a\":", 0)),
               Contains("junk.safetensors") && Contains("not valid JSON"));
    CHECK_THAT(format_error_for(dir, "ent.safetensors", image("{\"a\":[1]}", 0)), Contains("'a'"));
  }
  SECTION("metadata must map strings to strings") {
    CHECK_THAT(format_error_for(dir, "md.safetensors", image("{\"__metadata__\":{\"epoch\":3}}", 0)),
               Contains("md.safetensors") && Contains("'epoch'"));
    CHECK_THAT(format_error_for(dir, "md2.safetensors", image("{\"__metadata__\":[\"x\"]}", 0)),
               Contains("md2.safetensors") && Contains("__metadata__"));
  }
  SECTION("shape entries must be non-negative integers and not overflow") {
    CHECK_THAT(format_error_for(dir, "neg.safetensors", image("{" + entry("n", "F32", "[-1]", 0, 0) + "}", 0)),
               Contains("'n'") && Contains("non-negative"));
    CHECK_THAT(format_error_for(dir, "flt.safetensors", image("{" + entry("f", "F32", "[1.5]", 0, 4) + "}", 4)),
               Contains("'f'"));
    CHECK_THAT(format_error_for(dir, "of.safetensors",
                                image("{" + entry("o", "F64", "[4294967296,4294967296,16]", 0, 8) + "}", 8)),
               Contains("of.safetensors") && Contains("'o'") && Contains("overflow"));
    CHECK_THAT(format_error_for(dir, "noshape.safetensors",
                                image("{\"s\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4)),
               Contains("'s'") && Contains("shape"));
  }
  SECTION("data_offsets must be an ordered pair inside the data") {
    CHECK_THAT(format_error_for(dir, "rev.safetensors", image("{" + entry("r", "U8", "[0]", 8, 4) + "}", 8)),
               Contains("'r'") && Contains("begin 8 > end 4"));
    CHECK_THAT(format_error_for(dir, "past.safetensors", image("{" + entry("p", "U8", "[8]", 0, 8) + "}", 4)),
               Contains("past.safetensors") && Contains("'p'") && Contains("4 bytes"));
    CHECK_THAT(format_error_for(dir, "three.safetensors",
                                image("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", 2)),
               Contains("'t'") && Contains("data_offsets"));
  }
  SECTION("a zero in the shape is a legal empty tensor, even with a huge other dim") {
    const std::string p = dir + "/ok.safetensors";
    spit(p, image("{" + entry("e", "F32", "[0,9223372036854775807]", 0, 0) + "," + entry("x", "U8", "[2]", 0, 2) +
                      "}",
                  2));
    emt::SafetensorsReader r(p);
    CHECK(r.load("e").numel() == 0);
    CHECK(r.load("x").sizes() == torch::IntArrayRef{2});
    CHECK_THAT(error_of<emt::FormatError>([&] { r.info("missing"); }), Contains("ok.safetensors") && Contains("'missing'"));
  }
}

TEST_CASE("safetensors header parser is usable on its own", "[safetensors]") {
  std::map<std::string, std::string> md;
  auto infos = emt::parse_safetensors_header(
      "{\"b\":{\"dtype\":\"I8\",\"shape\":[2],\"data_offsets\":[2,4]},"
      "\"a\":{\"dtype\":\"I16\",\"shape\":[1],\"data_offsets\":[0,2]},\"__metadata__\":{\"k\":\"v\"}}   ",
      4, "mem", &md);
  REQUIRE(infos.size() == 2);
  CHECK(infos[0].name == "a");  // sorted by offset
  CHECK(infos[1].name == "b");
  CHECK(md.at("k") == "v");
  CHECK_THROWS_AS(emt::parse_safetensors_header("{}x", 0, "mem"), emt::FormatError);
}
