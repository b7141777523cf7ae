// PEFT adapter files (LoRA + modules_to_save, prompt tuning), projector files and key styles: byte-level
// fixtures written by the real PEFT (test/interop/make_peft_fixtures.py), round trips into fresh models, and one
// error naming every mismatch.
#include <emt/adapters/lora.h>
#include <emt/adapters/peft.h>
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/core/safetensors.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "helpers.h"
#include "test_adapters_fake.h"

using emt_test::fake_ids;
using emt_test::fake_image;
using emt_test::make_fake;
using emt_test::max_abs_diff;
using json = nlohmann::json;

namespace {

std::string fixture(const std::string& name) {
  return emt::read_file(std::string(EMT_SOURCE_DIR) + "/test/fixtures/adapters/" + name);
}

emt::LoraConfig fixture_lora() {
  emt::LoraConfig c;
  c.r = 4;
  c.alpha = 8.0;
  c.dropout = 0.05;
  return c;
}

// A fake model with a trained-looking adapter and projector.
std::shared_ptr<emt_test::FakeLlava> trained_model() {
  auto m = make_fake();
  emt::inject_lora(*m, fixture_lora());
  emt_test::randomize_lora(*m);
  torch::NoGradGuard ng;
  m->linear_1->weight.mul_(1.5);
  m->linear_2->bias.add_(0.25);
  return m;
}

std::string format_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const emt::FormatError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("peft: key styles map both ways and are detected", "[adapters]") {
  using emt::KeyStyle;
  const std::pair<const char*, const char*> cases[] = {
      {"language_model.model.layers.3.self_attn.q_proj", "model.language_model.layers.3.self_attn.q_proj"},
      {"language_model.lm_head.weight", "lm_head.weight"},
      {"multi_modal_projector.linear_1", "model.multi_modal_projector.linear_1"},
      {"vision_tower.vision_model.encoder.layers.0.mlp.fc1", "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1"},
      {"model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj"},  // plain LLaMA: untouched
  };
  for (const auto& [old_path, new_path] : cases) {
    CHECK(emt::path_to_style(old_path, KeyStyle::New) == new_path);
    CHECK(emt::path_to_style(old_path, KeyStyle::Old) == old_path);
    CHECK(emt::path_to_old_style(new_path) == old_path);
  }
  CHECK(emt::detect_key_style({"language_model.model.x"}, "f") == KeyStyle::Old);
  CHECK(emt::detect_key_style({"lm_head.weight", "model.language_model.x"}, "f") == KeyStyle::New);
  CHECK_FALSE(emt::detect_key_style({"model.layers.0.x"}, "f").has_value());
  CHECK(format_error([] { emt::detect_key_style({"language_model.model.x", "model.language_model.x"}, "f"); })
            .find("mixes") != std::string::npos);
  CHECK_THROWS_AS(emt::parse_key_style("newest"), emt::ConfigError);
}

TEST_CASE("peft: saved LoRA adapter matches PEFT's format for LLaVA-1.5 paths (both key styles)", "[adapters]") {
  for (const std::string style : {"old", "new"}) {
    DYNAMIC_SECTION("key style " << style) {
      auto m = trained_model();
      auto dir = emt_test::scratch_dir("adapters_fixture_" + style);
      emt::LoraSaveOptions opts;
      opts.key_style = style;
      opts.base_model_name_or_path = "llava-hf/llava-1.5-7b-hf";
      opts.modules_to_save = {"multi_modal_projector"};
      emt::save_lora_adapter(*m, fixture_lora(), dir, opts);
      // adapter_config.json byte for byte as Python's json.dumps(indent=2, sort_keys=True) writes PEFT's config.
      CHECK(emt::read_file(dir + "/adapter_config.json") == fixture("lora_config_" + style + ".json"));
      emt::SafetensorsReader reader(dir + "/adapter_model.safetensors");
      auto want = json::parse(fixture("lora_keys_" + style + ".json"));
      std::map<std::string, std::vector<int64_t>> got;
      for (const auto& n : reader.names()) got[n] = reader.info(n).shape;
      CHECK(got.size() == want.size());
      for (const auto& [k, v] : want.items()) {
        INFO(k);
        REQUIRE(got.count(k));
        CHECK(got[k] == v.get<std::vector<int64_t>>());
        CHECK(reader.info(k).dtype == "F32");
      }
      CHECK(reader.metadata().at("format") == "pt");
      // The trained projector also goes to its own file with the original LLaVA names.
      emt::SafetensorsReader proj(dir + "/mm_projector.safetensors");
      CHECK(proj.names().size() == 4);
      for (const char* k : {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
                            "model.mm_projector.2.bias"})
        CHECK(proj.contains(k));
      CHECK(torch::equal(proj.load("model.mm_projector.0.weight"), m->linear_1->weight.detach()));
    }
  }
}

TEST_CASE("peft: LoRA round trip into a fresh model gives the same logits (both key styles, bf16 file)",
          "[adapters]") {
  auto m = trained_model();
  auto img = fake_image();
  auto ids = fake_ids();
  torch::NoGradGuard ng;
  auto want = m->forward(img, ids);
  auto base = make_fake()->forward(img, ids);
  REQUIRE(max_abs_diff(want, base) > 1e-3);
  for (const std::string style : {"old", "new"}) {
    auto dir = emt_test::scratch_dir("adapters_roundtrip_" + style);
    emt::LoraSaveOptions opts;
    opts.key_style = style;
    opts.modules_to_save = {"multi_modal_projector"};
    emt::save_lora_adapter(*m, fixture_lora(), dir, opts);
    auto fresh = make_fake();
    auto loaded = emt::load_lora_adapter(*fresh, dir);
    CHECK(emt::to_string(loaded.key_style) == style);
    CHECK(loaded.lora_modules.size() == 14);
    CHECK(loaded.full_params.size() == 4);
    CHECK(loaded.config.r == 4);
    CHECK(loaded.config.lora_alpha == 8.0);
    CHECK(torch::equal(fresh->forward(img, ids), want));
    for (auto& [p, lin] : emt::lora_layers(*fresh)) {
      CHECK_FALSE(lin->lora_A->weight.requires_grad());
      CHECK_FALSE(lin->weight.requires_grad());
    }
  }
  // A bf16 file loads into an f32 model with bf16 rounding of A and B only.
  auto dir = emt_test::scratch_dir("adapters_roundtrip_bf16");
  emt::LoraSaveOptions opts;
  opts.dtype = "bf16";
  emt::save_lora_adapter(*m, fixture_lora(), dir, opts);
  emt::SafetensorsReader reader(dir + "/adapter_model.safetensors");
  CHECK(reader.info(reader.names()[0]).dtype == "BF16");
  auto fresh = make_fake();
  emt::load_lora_adapter(*fresh, dir, /*trainable=*/true);
  for (auto& [p, lin] : emt::lora_layers(*fresh)) CHECK(lin->lora_B->weight.requires_grad());
  // No projector was saved this time, so compare against the model with the base projector.
  auto m2 = make_fake();
  emt::inject_lora(*m2, fixture_lora());
  emt_test::randomize_lora(*m2);
  CHECK(max_abs_diff(fresh->forward(img, ids), m2->forward(img, ids)) < 2e-2);
}

TEST_CASE("peft: rsLoRA, rank_pattern and alpha_pattern survive the file", "[adapters]") {
  auto m = make_fake();
  auto cfg = fixture_lora();
  cfg.use_rslora = true;
  cfg.rank_pattern = {{"q_proj", 2}};
  cfg.alpha_pattern = {{"layers.1.mlp.down_proj", 3.5}};
  emt::inject_lora(*m, cfg);
  emt_test::randomize_lora(*m);
  auto dir = emt_test::scratch_dir("adapters_patterns");
  emt::save_lora_adapter(*m, cfg, dir, {});
  auto j = json::parse(emt::read_file(dir + "/adapter_config.json"));
  CHECK(j["use_rslora"] == true);
  CHECK(j["rank_pattern"] == json({{"q_proj", 2}}));
  CHECK(j["alpha_pattern"] == json({{"layers.1.mlp.down_proj", 3.5}}));
  auto fresh = make_fake();
  emt::load_lora_adapter(*fresh, dir);
  CHECK(fresh->decoder[0]->q->lora_rank() == 2);
  CHECK(fresh->decoder[0]->q->lora_scale() == Approx(8.0 / std::sqrt(2.0)));
  CHECK(fresh->decoder[1]->down->lora_scale() == Approx(3.5 / 2.0));
  torch::NoGradGuard ng;
  CHECK(torch::equal(fresh->forward(fake_image(), fake_ids()), m->forward(fake_image(), fake_ids())));

  // Settings that do not describe the layers are refused instead of writing a lying config.
  auto other = fixture_lora();
  CHECK_THROWS_AS(emt::save_lora_adapter(*m, other, dir, {}), emt::ConfigError);
  // A name list that PEFT would apply exactly is written as a list (here: the vision tower has no o_proj).
  auto m3 = make_fake();
  auto c3 = fixture_lora();
  c3.target_modules = {"o_proj", "down_proj"};
  emt::inject_lora(*m3, c3);
  auto dir3 = emt_test::scratch_dir("adapters_namelist");
  emt::save_lora_adapter(*m3, c3, dir3, {});
  CHECK(json::parse(emt::read_file(dir3 + "/adapter_config.json"))["target_modules"] ==
        json({"down_proj", "o_proj"}));
}

TEST_CASE("peft: an adapter for a different base fails with every mismatch named, model untouched",
          "[adapters]") {
  auto m = trained_model();
  auto dir = emt_test::scratch_dir("adapters_mismatch");
  emt::LoraSaveOptions opts;
  opts.modules_to_save = {"multi_modal_projector"};
  emt::save_lora_adapter(*m, fixture_lora(), dir, opts);

  emt_test::FakeDims dims;
  dims.d = 24;      // every LLM projection and the projector output change shape
  dims.layers = 1;  // layer 1 does not exist
  auto other = make_fake(1, dims);
  auto msg = format_error([&] { emt::load_lora_adapter(*other, dir); });
  INFO(msg);
  REQUIRE_FALSE(msg.empty());
  CHECK(msg.find("adapter_model.safetensors: adapter does not fit the model") != std::string::npos);
  for (const char* mod : {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}) {
    CHECK((msg.find("module 'language_model.model.layers.1.self_attn." + std::string(mod) + "' does not exist") !=
               std::string::npos ||
           msg.find("module 'language_model.model.layers.1.mlp." + std::string(mod) + "' does not exist") !=
               std::string::npos));
    CHECK(msg.find("language_model.model.layers.0.") != std::string::npos);
  }
  CHECK(msg.find("tensor 'base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight' has "
                 "shape [4, 16], the layer needs [4, 24]") != std::string::npos);
  CHECK(msg.find("tensor 'base_model.model.language_model.model.layers.0.mlp.down_proj.lora_B.weight' has shape "
                 "[16, 4], the layer needs [24, 4]") != std::string::npos);
  CHECK(msg.find("tensor 'base_model.model.multi_modal_projector.linear_1.weight' has shape [16, 12], the "
                 "model's 'multi_modal_projector.linear_1.weight' is [24, 12]") != std::string::npos);
  // 7 missing modules + layer 0: q/k/v/o both A and B (8), gate/up A (2), down B (1) + 4 projector tensors.
  CHECK(msg.find("(22 problems)") != std::string::npos);
  CHECK(emt::lora_layers(*other).empty());

  // Unpaired A/B, a non-Linear target, wrong peft_type, a missing directory.
  auto dir2 = emt_test::scratch_dir("adapters_unpaired");
  emt::save_safetensors(dir2 + "/adapter_model.safetensors",
                        {{"base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight",
                          torch::zeros({4, 16})},
                         {"base_model.model.language_model.model.norm.lora_A.weight", torch::zeros({4, 16})},
                         {"base_model.model.language_model.model.norm.lora_B.weight", torch::zeros({16, 4})},
                         {"stray", torch::zeros({1})}});
  emt::write_file_atomic(dir2 + "/adapter_config.json", R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8})");
  auto fresh = make_fake();
  auto msg2 = format_error([&] { emt::load_lora_adapter(*fresh, dir2); });
  INFO(msg2);
  CHECK(msg2.find("(3 problems)") != std::string::npos);
  CHECK(msg2.find("'language_model.model.layers.0.self_attn.q_proj' has lora_A but no lora_B") != std::string::npos);
  CHECK(msg2.find("'language_model.model.norm' is not a Linear layer") != std::string::npos);
  CHECK(msg2.find("tensor 'stray' does not start with 'base_model.model.'") != std::string::npos);
  // Rank in the file disagreeing with adapter_config.json.
  emt::write_file_atomic(dir2 + "/adapter_config.json", R"({"peft_type": "LORA", "r": 8, "lora_alpha": 8})");
  emt::save_safetensors(dir2 + "/adapter_model.safetensors",
                        {{"base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight",
                          torch::zeros({4, 16})},
                         {"base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_B.weight",
                          torch::zeros({16, 4})}});
  CHECK(format_error([&] { emt::load_lora_adapter(*fresh, dir2); }).find("gives r = 8") != std::string::npos);
  emt::write_file_atomic(dir2 + "/adapter_config.json", R"({"peft_type": "PROMPT_TUNING"})");
  CHECK(format_error([&] { emt::load_lora_adapter(*fresh, dir2); }).find("expected 'LORA'") != std::string::npos);
  emt::write_file_atomic(dir2 + "/adapter_config.json", R"({"peft_type": "LORA", "r": "four"})");
  CHECK(format_error([&] { emt::load_lora_adapter(*fresh, dir2); }).find("'r' must be a number") !=
        std::string::npos);
  emt::write_file_atomic(dir2 + "/adapter_config.json", R"({"peft_type": "LORA", "use_dora": true})");
  CHECK(format_error([&] { emt::load_lora_adapter(*fresh, dir2); }).find("DoRA") != std::string::npos);
  emt::write_file_atomic(dir2 + "/adapter_config.json", "{not json");
  CHECK(format_error([&] { emt::load_lora_adapter(*fresh, dir2); }).find("invalid JSON") != std::string::npos);
  CHECK_THROWS_AS(emt::load_lora_adapter(*fresh, dir2 + "/nope"), emt::IoError);
  CHECK(emt::lora_layers(*fresh).empty());
}

TEST_CASE("peft: prompt-tuning adapter file and initialisation", "[adapters]") {
  auto dir = emt_test::scratch_dir("adapters_prompt");
  torch::manual_seed(4);
  auto table = torch::randn({20, 16});
  std::vector<int64_t> text = {3, 7};
  auto emb = emt::init_prompt_embeddings(5, table, "text", text);
  REQUIRE(emb.sizes() == torch::IntArrayRef({5, 16}));
  // Shorter text is repeated, then cut to K: rows 3, 7, 3, 7, 3.
  for (int64_t i = 0; i < 5; ++i) CHECK(torch::equal(emb[i], table[text[i % 2]]));
  CHECK(torch::equal(emt::init_prompt_embeddings(1, table, "text", text)[0], table[3]));
  auto rnd = emt::init_prompt_embeddings(400, table, "random");
  CHECK(std::abs(rnd.std().item<double>() - 1.0) < 0.05);  // nn.Embedding's N(0, 1)
  CHECK_THROWS_AS(emt::init_prompt_embeddings(0, table, "random"), emt::ConfigError);
  CHECK_THROWS_AS(emt::init_prompt_embeddings(2, table, "text", {}), emt::ConfigError);
  CHECK_THROWS_AS(emt::init_prompt_embeddings(2, table, "text", {20}), emt::ConfigError);
  CHECK_THROWS_AS(emt::init_prompt_embeddings(2, table, "vocab"), emt::ConfigError);

  emt::PromptAdapterMeta meta;
  meta.base_model_name_or_path = "llava-hf/llava-1.5-7b-hf";
  meta.tokenizer_name_or_path = "llava-hf/llava-1.5-7b-hf";
  meta.init = "text";
  meta.init_text = "classify the image";
  meta.num_attention_heads = 2;
  meta.num_layers = 2;
  emt::save_prompt_adapter(dir, emb, meta);
  CHECK(emt::read_file(dir + "/adapter_config.json") == fixture("prompt_config.json"));
  emt::SafetensorsReader reader(dir + "/adapter_model.safetensors");
  CHECK(reader.names() == std::vector<std::string>{"prompt_embeddings"});
  emt::AdapterFileConfig cfg;
  auto back = emt::load_prompt_adapter(dir, 16, &cfg);
  CHECK(torch::equal(back, emb));
  CHECK(cfg.num_virtual_tokens == 5);
  CHECK(cfg.prompt_tuning_init == "TEXT");
  CHECK(format_error([&] { emt::load_prompt_adapter(dir, 24); }).find("24 wide") != std::string::npos);
  CHECK(emt::describe_adapter(dir).find("prompt_embeddings  F32  [5, 16]") != std::string::npos);
  // A LoRA directory is not a prompt adapter, and vice versa.
  auto m = trained_model();
  auto ldir = emt_test::scratch_dir("adapters_prompt_lora");
  emt::save_lora_adapter(*m, fixture_lora(), ldir, {});
  CHECK(format_error([&] { emt::load_prompt_adapter(ldir); }).find("expected 'PROMPT_TUNING'") != std::string::npos);
  CHECK_THROWS_AS(emt::save_prompt_adapter(dir, torch::zeros({4}), meta), emt::ConfigError);
}

TEST_CASE("peft: projector files in LLaVA and HF naming load into a projector", "[adapters]") {
  auto src = trained_model();
  auto dir = emt_test::scratch_dir("adapters_projector");
  for (auto naming : {emt::ProjectorNaming::Llava, emt::ProjectorNaming::Hf}) {
    std::string path = dir + "/p.safetensors";
    emt::save_projector_file(*src->projector, path, naming);
    auto dst = make_fake();
    CHECK(emt::load_projector_file(*dst->projector, path) == naming);
    CHECK(torch::equal(dst->linear_1->weight, src->linear_1->weight));
    CHECK(torch::equal(dst->linear_2->bias, src->linear_2->bias));
  }
  auto hf = emt::projector_tensors(*src->projector, emt::ProjectorNaming::Hf);
  CHECK(hf[0].first == "multi_modal_projector.linear_1.weight");
  // New-style HF names and LLaVA names without "model." are accepted too.
  std::string path = dir + "/q.safetensors";
  emt::save_safetensors(path, {{"model.multi_modal_projector.linear_1.weight", torch::ones({16, 12})},
                               {"model.multi_modal_projector.linear_1.bias", torch::ones({16})},
                               {"mm_projector.2.weight", torch::ones({16, 16})},
                               {"mm_projector.2.bias", torch::ones({16})}});
  auto dst = make_fake();
  emt::load_projector_file(*dst->projector, path);
  CHECK(dst->linear_2->weight.sum().item<double>() == 256);
  // A linear (one-layer) projector uses LLaVA v0's plain `model.mm_projector.weight`.
  auto lin = std::make_shared<torch::nn::Module>();
  lin->register_module("linear_1", emt::Linear(emt::LinearOptions{12, 16, true}));
  auto lv = emt::projector_tensors(*lin, emt::ProjectorNaming::Llava);
  CHECK(lv[0].first == "model.mm_projector.weight");
  CHECK(lv[1].first == "model.mm_projector.bias");
  // Mismatches: all named at once.
  emt::save_safetensors(path, {{"model.mm_projector.0.weight", torch::ones({16, 10})},
                               {"model.mm_projector.5.weight", torch::ones({1})}});
  auto msg = format_error([&] { emt::load_projector_file(*dst->projector, path); });
  INFO(msg);
  CHECK(msg.find("(5 problems)") != std::string::npos);
  CHECK(msg.find("'model.mm_projector.0.weight' has shape [16, 10]") != std::string::npos);
  CHECK(msg.find("unexpected tensor 'model.mm_projector.5.weight'") != std::string::npos);
  CHECK(msg.find("missing tensor for 'linear_2.bias'") != std::string::npos);
}

TEST_CASE("peft: describe_adapter lists config and tensors", "[adapters]") {
  auto m = trained_model();
  auto dir = emt_test::scratch_dir("adapters_describe");
  emt::LoraSaveOptions opts;
  opts.modules_to_save = {"multi_modal_projector"};
  emt::save_lora_adapter(*m, fixture_lora(), dir, opts);
  auto text = emt::describe_adapter(dir);
  CHECK(text.find("\"peft_type\": \"LORA\"") != std::string::npos);
  CHECK(text.find("base_model.model.language_model.model.layers.1.mlp.down_proj.lora_A.weight  F32  [4, 24]") !=
        std::string::npos);
  CHECK(text.find("32 tensors") != std::string::npos);
  CHECK(text.find("mm_projector.safetensors") != std::string::npos);
}
