// The original LLaVA layout (the paper's LLaVA-7b-v0): LLaMA fields at the top of config.json, `model.layers.*`,
// `model.mm_projector.*`, `lm_head.*`, the CLIP tower in its own folder named by mm_vision_tower, and
// mm_use_im_start_end wrapping the image embeddings in <im_start>/<im_end>. Tested on tiny random folders.
#include <emt/core/error.h>
#include <emt/core/hf_checkpoint.h>
#include <emt/core/llava.h>
#include <emt/core/runtime.h>
#include <emt/core/safetensors.h>
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "expect_error.h"
#include "helpers.h"
#include "test_batches.h"
#include "test_models_common.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int64_t kPatch = 44, kStart = 45, kEnd = 46;

struct V0Folders {
  std::string llava, clip;
};

// Writes `model` (linear projector) as an original-layout LLaVA folder and its tower as a CLIPVisionModel folder.
// with_tower: the checkpoint also holds the tower (model.vision_tower.vision_tower.*), as some fine-tunes save it.
V0Folders write_v0(emt::LlavaModel& model, const std::string& name, const std::string& mm_vision_tower = "",
                   bool with_tower = false) {
  V0Folders f{emt_test::scratch_dir(name + "_llava"), emt_test::scratch_dir(name + "_clip")};
  const auto& v = model->options.vision;
  json clip_cfg = {{"model_type", "clip_vision_model"}, {"hidden_size", v.encoder.hidden_size},
                   {"intermediate_size", v.encoder.intermediate_size}, {"num_hidden_layers", v.encoder.num_layers},
                   {"num_attention_heads", v.encoder.num_heads}, {"image_size", v.image_size},
                   {"patch_size", v.patch_size}, {"hidden_act", v.encoder.hidden_act}};
  emt::write_file_atomic(f.clip + "/config.json", clip_cfg.dump(2));
  emt::NamedTensors tower, weights;
  for (const auto& p : model->vision_tower->named_parameters()) tower.emplace_back(p.key(), p.value().detach());
  emt::save_safetensors(f.clip + "/model.safetensors", tower);

  emt::save_llama(model->language_model, f.llava);  // model.* and lm_head.* with LLaMA's config.json
  emt::SafetensorsReader r(f.llava + "/model.safetensors");
  for (const auto& n : r.names()) weights.emplace_back(n, r.load(n));
  for (const auto& p : model->multi_modal_projector->named_parameters())
    weights.emplace_back("model.mm_projector." + p.key().substr(std::string("linear_1.").size()), p.value().detach());
  if (with_tower)
    for (const auto& [k, t] : tower) weights.emplace_back("model.vision_tower.vision_tower." + k, t);
  emt::save_safetensors(f.llava + "/model.safetensors", weights);
  auto cfg = json::parse(emt::read_file(f.llava + "/config.json"));
  cfg["model_type"] = "llava";
  cfg["architectures"] = {"LlavaLlamaForCausalLM"};
  cfg["mm_vision_tower"] = mm_vision_tower.empty() ? f.clip : mm_vision_tower;
  cfg["mm_hidden_size"] = v.encoder.hidden_size;
  cfg["mm_vision_select_layer"] = model->options.select_layer;
  cfg["mm_use_im_start_end"] = true;
  cfg["use_mm_proj"] = true;
  emt::write_file_atomic(f.llava + "/config.json", cfg.dump(2));
  emt::write_file_atomic(f.llava + "/added_tokens.json",
                         json{{"<im_patch>", kPatch}, {"<im_start>", kStart}, {"<im_end>", kEnd}}.dump());
  return f;
}

emt::LlavaModel v0_source(uint64_t seed) {
  torch::manual_seed(seed);
  auto m = emt_test::tiny_model_section("linear");
  m.vision.select_layer = -2;
  m.vision.select_feature = "patch";
  auto model = emt::build_llava(m, kPatch);
  model->options.im_start_id = kStart;
  model->options.im_end_id = kEnd;
  model->eval();
  return model;
}

}  // namespace

TEST_CASE("llava v0: an original-layout checkpoint loads, wraps the image in <im_start>/<im_end>, matches",
          "[models][hf]") {
  auto src = v0_source(31);
  auto f = write_v0(src, "v0_load");
  auto got = emt::load_llava(f.llava);
  got->eval();
  CHECK(got->image_token_id == kPatch);
  CHECK(got->options.im_start_id == kStart);
  CHECK(got->options.im_end_id == kEnd);
  CHECK(got->options.select_layer == -2);
  CHECK(got->options.select_feature == "patch");
  CHECK(got->options.projector.type == "linear");
  CHECK(got->options.num_image_tokens() == src->options.vision.num_patches() + 2);
  CHECK(emt::model_section_from_hf(f.llava).conversation == "llava_v0");

  torch::NoGradGuard ng;
  auto b = emt_test::memorise_batch(kPatch);
  auto want = src->forward(b.images, b.input_ids, b.attention_mask).logits;
  auto have = got->forward(b.images, b.input_ids, b.attention_mask).logits;
  REQUIRE(have.sizes() == want.sizes());
  CHECK(emt_test::max_diff(have, want) < 1e-6);

  // The image block is <im_start>, the N projected patches, <im_end>.
  auto s = got->splice(got->encode_images(b.images), b.input_ids, b.attention_mask);
  const int64_t p = s.image_starts[0].item<int64_t>(), n = src->options.vision.num_patches();
  auto embed = got->language_model->embed(torch::tensor({kStart, kEnd}).view({1, 2}))[0];
  CHECK(emt_test::max_diff(s.embeds[0][p], embed[0]) == 0.0);
  CHECK(emt_test::max_diff(s.embeds[0][p + n + 1], embed[1]) == 0.0);
  CHECK(s.embeds.size(1) == b.input_ids.size(1) - 1 + n + 2);

  // The wrapping matters: without it the same weights read the question differently after the image.
  src->options.im_start_id = src->options.im_end_id = -1;
  auto plain = src->forward(b.images, b.input_ids, b.attention_mask).logits;
  REQUIRE(plain.size(1) == have.size(1) - 2);
  CHECK(emt_test::max_diff(plain.narrow(1, 0, 1), have.narrow(1, 0, 1)) < 1e-5);  // BOS, before the image
  CHECK(emt_test::max_diff(plain.narrow(1, p + n, 1), have.narrow(1, p + n + 2, 1)) > 1e-3);  // first text token after
}

TEST_CASE("llava v0: the tower from the checkpoint itself, from model.vision_tower, or a clear error",
          "[models][hf]") {
  auto src = v0_source(32);
  torch::NoGradGuard ng;
  auto b = emt_test::memorise_batch(kPatch);
  auto want = src->forward(b.images, b.input_ids, b.attention_mask).logits;

  SECTION("a checkpoint that holds the tower needs no CLIP folder beside it for its weights") {
    auto f = write_v0(src, "v0_with_tower", "", /*with_tower=*/true);
    auto got = emt::load_llava(f.llava);
    CHECK(emt_test::max_diff(got->forward(b.images, b.input_ids, b.attention_mask).logits, want) < 1e-6);
  }
  SECTION("mm_vision_tower names a hub id: the error says what to set, and model.vision_tower fixes it") {
    auto f = write_v0(src, "v0_hub_id", "openai/clip-vit-large-patch14");
    auto msg = emt_test::error_of<emt::ConfigError>([&] { emt::load_llava(f.llava); });
    CHECK_THAT(msg, Catch::Contains("openai/clip-vit-large-patch14") && Catch::Contains("mm_vision_tower") &&
                        Catch::Contains("model.vision_tower"));
    auto got = emt::load_llava(f.llava, torch::kFloat32, torch::kCPU, f.clip);
    CHECK(emt_test::max_diff(got->forward(b.images, b.input_ids, b.attention_mask).logits, want) < 1e-6);
    CHECK_THAT(emt_test::error_of<emt::IoError>([&] { emt::load_llava(f.llava, torch::kFloat32, torch::kCPU, "/nope"); }),
               Catch::Contains("model.vision_tower") && Catch::Contains("/nope"));
  }
  SECTION("a tower whose width is not mm_hidden_size is refused") {
    auto f = write_v0(src, "v0_bad_width");
    auto cfg = json::parse(emt::read_file(f.llava + "/config.json"));
    cfg["mm_hidden_size"] = 1024;
    emt::write_file_atomic(f.llava + "/config.json", cfg.dump());
    CHECK_THAT(emt_test::error_of<emt::FormatError>([&] { emt::load_llava(f.llava); }),
               Catch::Contains("mm_hidden_size 1024"));
  }
  SECTION("a missing projector tensor is named") {
    auto f = write_v0(src, "v0_no_proj");
    emt::SafetensorsReader r(f.llava + "/model.safetensors");
    emt::NamedTensors keep;
    for (const auto& n : r.names())
      if (n != "model.mm_projector.bias") keep.emplace_back(n, r.load(n));
    emt::save_safetensors(f.llava + "/model.safetensors", keep);
    CHECK_THAT(emt_test::error_of<emt::FormatError>([&] { emt::load_llava(f.llava); }),
               Catch::Contains("multi_modal_projector.linear_1.bias"));
  }
}

TEST_CASE("llava v0: a wrapped model saved by emt loads back wrapped", "[models][hf]") {
  auto src = v0_source(33);
  auto dir = emt_test::scratch_dir("v0_resave");
  emt::save_llava(src, dir);
  auto got = emt::load_llava(dir);
  CHECK(got->options.im_start_id == kStart);
  CHECK(got->options.im_end_id == kEnd);
  torch::NoGradGuard ng;
  got->eval();
  auto b = emt_test::memorise_batch(kPatch);
  CHECK(emt_test::max_diff(got->forward(b.images, b.input_ids, b.attention_mask).logits,
                           src->forward(b.images, b.input_ids, b.attention_mask).logits) < 1e-6);
}
