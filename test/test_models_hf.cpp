// Model tests against files: golden outputs of an independent reference (test/fixtures/models, made by
// scripts/fixtures/make_model_goldens.py), HF-layout save/load in both key styles and sharded, strict-load
// errors, config.json shapes, and the `emt model summary` command.
#include <catch2/catch.hpp>
#include <emt/adapters/lora.h>
#include <emt/adapters/peft.h>
#include <emt/core/error.h>
#include <emt/core/generate.h>
#include <emt/core/hf_checkpoint.h>
#include <emt/core/image.h>
#include <emt/core/llava.h>
#include <emt/core/safetensors.h>
#include <emt/core/tokenizer.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "helpers.h"
#include "test_models_common.h"

using emt_test::max_diff;
using emt_test::model_fixture;
using emt_test::tiny_model_section;
namespace fs = std::filesystem;

namespace {

struct HfFixture {
  explicit HfFixture(const std::string& name) : reader(model_fixture(name)), file(model_fixture(name)) {
    config = nlohmann::json::parse(file.metadata().at("config"));
  }
  torch::Tensor operator[](const std::string& n) const { return file.load(n); }
  // loads the fixture's weights into `m` strictly (inputs and expectations are not weights)
  void load_into(torch::nn::Module& m) const {
    emt::load_state_strict(m, reader, [](const std::string& k) {
      return k.rfind("input.", 0) == 0 || k.rfind("expected.", 0) == 0 ? std::string() : k;
    }, "fixture");
  }
  emt::CheckpointReader reader;
  emt::SafetensorsReader file;
  nlohmann::json config;
};

// Writes the fixture's config.json + weights as an HF directory (how real downloads look).
std::string fixture_as_hf_dir(const HfFixture& fx, const std::string& name) {
  auto dir = emt_test::scratch_dir(name);
  std::ofstream(dir + "/config.json") << fx.config.dump(2);
  emt::NamedTensors t;
  for (auto& n : fx.file.names())
    if (n.rfind("input.", 0) != 0 && n.rfind("expected.", 0) != 0) t.emplace_back(n, fx.file.load(n));
  emt::save_checkpoint(dir, t);
  return dir;
}

}  // namespace

TEST_CASE("CLIP vision and text match the reference goldens", "[models]") {
  HfFixture fx("clip.safetensors");
  auto dir = fixture_as_hf_dir(fx, "models_clip_golden");
  auto clip = emt::load_clip(dir);
  clip->eval();
  torch::NoGradGuard ng;
  auto v = clip->vision_model->forward(fx["input.pixels"]);
  CHECK(max_diff(v.last_hidden_state, fx["expected.vision_last_hidden"]) <= 1e-4);
  CHECK(max_diff(v.hidden_states[v.hidden_states.size() - 2], fx["expected.vision_hidden_m2"]) <= 1e-4);
  CHECK(max_diff(v.pooled, fx["expected.vision_pooled"]) <= 1e-4);
  auto t = clip->text_model->forward(fx["input.ids"], fx["input.mask"]);
  auto real = fx["input.mask"].to(torch::kBool).unsqueeze(-1).expand_as(t.last_hidden_state);
  CHECK(max_diff(t.last_hidden_state.masked_select(real), fx["expected.text_last_hidden"].masked_select(real)) <= 1e-4);
  CHECK(max_diff(t.pooled, fx["expected.text_pooled"]) <= 1e-4);
  CHECK(max_diff(clip->forward(fx["input.pixels"], fx["input.ids"], fx["input.mask"]),
                 fx["expected.logits_per_image"]) <= 1e-4);

  // save + reload reproduces the model exactly
  auto out = emt_test::scratch_dir("models_clip_resave");
  emt::save_clip(clip, out);
  auto again = emt::load_clip(out);
  CHECK(max_diff(again->forward(fx["input.pixels"], fx["input.ids"], fx["input.mask"]),
                 clip->forward(fx["input.pixels"], fx["input.ids"], fx["input.mask"])) == 0.0);
}

TEST_CASE("LLaMA matches the reference golden", "[models]") {
  HfFixture fx("llama.safetensors");
  auto dir = fixture_as_hf_dir(fx, "models_llama_golden");
  auto llm = emt::load_llama(dir);
  llm->eval();
  torch::NoGradGuard ng;
  auto logits = llm->forward(fx["input.ids"], fx["input.mask"]);
  auto real = fx["input.mask"].to(torch::kBool).unsqueeze(-1).expand_as(logits);
  CHECK(max_diff(logits.masked_select(real), fx["expected.logits"].masked_select(real)) <= 1e-4);
  auto out = emt_test::scratch_dir("models_llama_resave");
  emt::save_llama(llm, out);
  CHECK(max_diff(emt::load_llama(out)->forward(fx["input.ids"], fx["input.mask"]), logits) == 0.0);
  // bf16 load converts every tensor
  auto half = emt::load_llama(dir, torch::kBFloat16);
  CHECK(half->model->layers->ptr<emt::LlamaDecoderLayerImpl>(0)->mlp->up_proj->weight.scalar_type() == torch::kBFloat16);
  // bf16 keeps 8 significant bits (relative rounding 2^-9 per value); weights and activations rounded through
  // the layers move the logits by a few tenths of a percent of their range. Every real token is checked, at 1%
  // of the range (measured: see the INFO line on failure), and the next-token choice must not change.
  auto hl = half->forward(fx["input.ids"], fx["input.mask"]).to(torch::kFloat32);
  const double range = (logits.max() - logits.min()).item<double>();
  const double err = max_diff(hl.masked_select(real), logits.masked_select(real));
  INFO("bf16 vs f32 logits: max abs diff " << err << " over a range of " << range);
  CHECK(err <= 0.01 * range);
  CHECK(torch::equal(hl.argmax(-1).masked_select(fx["input.mask"].to(torch::kBool)),
                     logits.argmax(-1).masked_select(fx["input.mask"].to(torch::kBool))));
}

TEST_CASE("LLaVA matches the reference golden", "[models]") {
  HfFixture fx("llava.safetensors");
  auto m = tiny_model_section();
  auto model = emt::build_llava(m, fx.config["image_token_index"].get<int64_t>());
  fx.load_into(*model);
  model->eval();
  torch::NoGradGuard ng;
  auto out = model->forward(fx["input.pixels"], fx["input.ids"], fx["input.mask"], fx["input.labels"]);
  auto mask = fx["expected.mask"];
  auto real = mask.to(torch::kBool).unsqueeze(-1).expand_as(out.logits);
  CHECK(max_diff(out.logits.masked_select(real), fx["expected.logits"].masked_select(real)) <= 1e-4);
  CHECK(torch::equal(out.labels, fx["expected.labels"]));
  CHECK(std::abs(out.loss.item<double>() - fx["expected.loss"].item<double>()) <= 1e-4);

  // the same weights as an HF directory with the fixture's config.json
  auto dir = fixture_as_hf_dir(fx, "models_llava_golden");
  CHECK(emt::model_section_from_hf(dir).projector == "mlp2x_gelu");
  auto loaded = emt::load_llava(dir);
  CHECK(loaded->image_token_id == 47);
  CHECK(max_diff(loaded->forward(fx["input.pixels"], fx["input.ids"], fx["input.mask"]).logits, out.logits) == 0.0);
}

TEST_CASE("LLaVA saved in both key styles, sharded or not, reloads to the same logits", "[models]") {
  torch::manual_seed(21);
  for (auto proj : {"linear", "mlp2x_gelu"}) {
    auto model = emt::build_llava(tiny_model_section(proj), 47);
    model->eval();
    torch::NoGradGuard ng;
    auto images = torch::randn({2, 3, 8, 8});
    auto ids = torch::tensor({{1, 47, 3, 4}, {47, 5, 6, 0}}, torch::kLong);
    auto mask = torch::tensor({{1, 1, 1, 1}, {1, 1, 1, 0}}, torch::kLong);
    auto before = model->forward(images, ids, mask).logits;
    for (std::string style : {"old", "new"}) {
      for (uint64_t shard : {uint64_t(5) << 30, uint64_t(20000)}) {
        auto dir = emt_test::scratch_dir(std::string("models_llava_") + proj + "_" + style + std::to_string(shard));
        emt::save_llava(model, dir, style, shard);
        bool sharded = fs::exists(dir + "/model.safetensors.index.json");
        CHECK(sharded == (shard == 20000));
        emt::CheckpointReader r(dir);
        CHECK(r.contains(style == "old" ? "language_model.model.norm.weight" : "model.language_model.norm.weight"));
        CHECK(r.contains(style == "old" ? "language_model.lm_head.weight" : "lm_head.weight"));
        CHECK(r.contains(style == "old" ? "vision_tower.vision_model.pre_layrnorm.weight"
                                        : "model.vision_tower.vision_model.pre_layrnorm.weight"));
        auto sec = emt::model_section_from_hf(dir);
        CHECK(sec.projector == proj);
        CHECK(sec.llm.num_kv_heads == 2);
        CHECK(sec.vision.select_layer == -2);
        CHECK(sec.vision.select_feature == "patch");
        auto loaded = emt::load_llava(dir);
        CHECK(max_diff(loaded->forward(images, ids, mask).logits, before) == 0.0);
      }
    }
  }
  auto model = emt::build_llava(tiny_model_section(), 47);
  CHECK_THROWS_AS(emt::save_llava(model, emt_test::scratch_dir("models_badstyle"), "newest"), emt::ConfigError);
}

TEST_CASE("key styles map onto the module names", "[models]") {
  CHECK(emt::llava_module_key("model.language_model.layers.3.mlp.up_proj.weight") ==
        "language_model.model.layers.3.mlp.up_proj.weight");
  CHECK(emt::llava_module_key("lm_head.weight") == "language_model.lm_head.weight");
  CHECK(emt::llava_module_key("model.vision_tower.vision_model.post_layernorm.bias") ==
        "vision_tower.vision_model.post_layernorm.bias");
  CHECK(emt::llava_module_key("model.multi_modal_projector.linear_2.bias") == "multi_modal_projector.linear_2.bias");
  // transformers 5's tower without the `vision_model.` level
  CHECK(emt::llava_module_key("vision_tower.embeddings.class_embedding") ==
        "vision_tower.vision_model.embeddings.class_embedding");
  CHECK(emt::llava_module_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight") ==
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight");
  CHECK(emt::llava_module_key("model.mm_projector.0.weight") == "multi_modal_projector.linear_1.weight");
  CHECK(emt::llava_module_key("model.mm_projector.2.bias") == "multi_modal_projector.linear_2.bias");
  CHECK(emt::llava_module_key("vision_tower.vision_model.embeddings.position_ids").empty());
  CHECK(emt::llava_module_key("language_model.model.layers.0.self_attn.rotary_emb.inv_freq").empty());
  CHECK(emt::llava_module_key("language_model.model.norm.weight") == "language_model.model.norm.weight");
  for (auto k : {"language_model.model.norm.weight", "language_model.lm_head.weight",
                 "vision_tower.vision_model.pre_layrnorm.weight", "multi_modal_projector.linear_1.bias"})
    CHECK(emt::llava_module_key(emt::llava_file_key(k, "new")) == k);
  CHECK_THROWS_AS(emt::llava_file_key("x", "mixed"), emt::ConfigError);
}

TEST_CASE("strict loading names every missing, unexpected and mis-shaped tensor at once", "[models]") {
  torch::manual_seed(22);
  auto model = emt::build_llava(tiny_model_section(), 47);
  auto dir = emt_test::scratch_dir("models_strict");
  emt::save_llava(model, dir);
  emt::CheckpointReader good(dir);
  emt::NamedTensors t;
  for (auto& n : good.names()) {
    if (n == "language_model.model.layers.1.mlp.down_proj.weight") continue;  // missing
    auto x = good.load(n);
    if (n == "multi_modal_projector.linear_1.bias") x = torch::zeros({7});   // wrong shape
    t.emplace_back(n, x);
  }
  t.emplace_back("language_model.model.layers.9.mlp.up_proj.weight", torch::zeros({2, 2}));  // unexpected
  fs::remove(dir + "/model.safetensors");
  emt::save_checkpoint(dir, t);
  try {
    emt::load_llava(dir);
    FAIL("load_llava accepted a broken checkpoint");
  } catch (const emt::FormatError& e) {
    std::string msg = e.what();
    CHECK(msg.find("3 problem(s)") != std::string::npos);
    CHECK(msg.find("missing tensor 'language_model.model.layers.1.mlp.down_proj.weight'") != std::string::npos);
    CHECK(msg.find("unexpected tensor 'language_model.model.layers.9.mlp.up_proj.weight'") != std::string::npos);
    CHECK(msg.find("'multi_modal_projector.linear_1.bias' has shape [7], model expects [32]") != std::string::npos);
  }
  // a tensor present under both key styles is a duplicate, not silently overwritten
  t.clear();
  for (auto& n : good.names()) t.emplace_back(n, good.load(n));
  t.emplace_back("lm_head.weight", good.load("language_model.lm_head.weight"));
  emt::save_checkpoint(dir, t);
  CHECK_THROWS_WITH(emt::load_llava(dir), Catch::Contains("both map to 'language_model.lm_head.weight'"));
  // wrong model types and missing directories
  CHECK_THROWS_AS(emt::load_llava(emt_test::scratch_dir("models_empty")), emt::IoError);
  std::ofstream(dir + "/config.json") << R"({"model_type": "bert"})";
  CHECK_THROWS_AS(emt::model_section_from_hf(dir), emt::FormatError);
  CHECK_THROWS_AS(emt::load_llava(dir), emt::FormatError);
  std::ofstream(dir + "/config.json") << R"({"model_type": "llama", "hidden_size": "big"})";
  CHECK_THROWS_WITH(emt::model_section_from_hf(dir), Catch::Contains("hidden_size"));
  std::ofstream(dir + "/config.json") << R"({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2}})";
  CHECK_THROWS_WITH(emt::model_section_from_hf(dir), Catch::Contains("rope_scaling"));
}

TEST_CASE("HF config defaults follow the HF classes (llava-1.5-7b-hf config.json)", "[models]") {
  auto dir = emt_test::scratch_dir("models_hf_config");
  // the shape fields a real llava-1.5-7b-hf config.json carries; everything else is an HF default
  std::ofstream(dir + "/config.json") << R"({
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
      "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
      "vocab_size": 32064},
    "tie_word_embeddings": false, "torch_dtype": "float16", "vision_config": {"hidden_size": 1024,
      "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model", "num_attention_heads": 16,
      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064})";
  auto m = emt::model_section_from_hf(dir);
  CHECK(m.projector == "mlp2x_gelu");  // no weights here: the llava-hf default
  CHECK(m.llm.hidden_size == 4096);
  CHECK(m.llm.num_layers == 32);
  CHECK(m.llm.intermediate_size == 11008);
  CHECK(m.llm.num_kv_heads == 32);
  CHECK(m.llm.vocab_size == 32064);
  CHECK(m.vision.hidden_act == "quick_gelu");
  CHECK(m.vision.image_size == 336);
  CHECK(m.pretrained == dir);
}

TEST_CASE("emt model summary prints the counts of a config", "[models]") {
  auto r = emt_test::run_cli(std::string("model summary ") + EMT_SOURCE_DIR + "/configs/models/llava-1.5-7b.yaml");
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(r.output.find("7,063,427,072") != std::string::npos);
  CHECK(r.output.find("303,507,456") != std::string::npos);
  CHECK(r.output.find("20,979,712") != std::string::npos);
  CHECK(r.output.find("6,738,939,904") != std::string::npos);
  r = emt_test::run_cli(std::string("model summary ") + EMT_SOURCE_DIR + "/configs/models/llava-1.5-13b.yaml --method lora --dtype f16");
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(r.output.find("13,351,494,656") != std::string::npos);
  r = emt_test::run_cli(std::string("model summary ") + EMT_SOURCE_DIR + "/configs/models/tiny.yaml --method nope");
  CHECK(r.code == 2);
}

TEST_CASE("emt generate answers from a model directory and dumps the next-token logits", "[models]") {
  auto dir = emt_test::scratch_dir("models_generate_dir");
  {
    std::ofstream corpus(dir + "/corpus.txt");
    for (int i = 0; i < 40; ++i)
      corpus << "what is the object in the image? the object is a cat " << i << ". a dog, a bird, a ship.\n";
  }
  emt::SentencePieceTrainOptions so;
  so.vocab_size = 80;
  emt::train_sentencepiece(dir + "/corpus.txt", dir + "/tokenizer", so);
  // as in llava-hf folders: <image> is an added token right after the SentencePiece vocabulary
  std::ofstream(dir + "/added_tokens.json") << "{\"<image>\": " << emt::load_sentencepiece(dir + "/tokenizer.model")->vocab_size() << "}";
  auto tok = emt::load_hf_tokenizer(dir);
  int64_t image_id = tok->special_token_id("<image>");
  REQUIRE(image_id >= 0);
  auto m = tiny_model_section();
  m.llm.vocab_size = static_cast<int>(tok->vocab_size());
  m.conversation = "plain";
  torch::manual_seed(31);
  auto model = emt::build_llava(m, image_id);
  model->eval();
  emt::save_llava(model, dir);
  auto png = dir + "/image.png";
  emt::write_png(png, torch::randint(0, 256, {8, 8, 3}, torch::kLong).to(torch::kUInt8));

  auto dump = dir + "/logits.safetensors";
  auto r = emt_test::run_cli("generate --model " + dir + " --image " + png + " --prompt 'what is it?' --max-new-tokens 3 --dump-logits " + dump);
  INFO(r.output);
  REQUIRE(r.code == 0);
  emt::SafetensorsReader f(dump);
  auto ids = f.load("input_ids");
  auto logits = f.load("logits");
  CHECK(ids[0][0].item<int64_t>() == tok->bos_id());
  CHECK(ids.eq(image_id).sum().item<int64_t>() == 1);
  CHECK(logits.sizes() == std::vector<int64_t>{1, tok->vocab_size()});
  auto pixels = emt::preprocess_image(emt::decode_image_file(png), emt::image_options_for_size(8)).unsqueeze(0);
  auto expect = emt::next_token_logits(model, pixels, ids, torch::ones_like(ids));
  CHECK(max_diff(logits, expect) <= 1e-5);
  // the printed answer is the greedy continuation
  emt::GenerateOptions g;
  g.max_new_tokens = 3;
  g.eos_id = tok->eos_id();
  auto answer = tok->decode(emt::generate(model, pixels, ids, torch::ones_like(ids), g)[0]);
  CHECK(r.output.find(answer) != std::string::npos);

  // --adapter: a LoRA checkpoint (with a trained projector) on top of the directory's weights
  auto adapter = dir + "/adapter";
  emt::LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8;
  lc.dropout = 0;
  lc.target_modules = {"q_proj", "v_proj"};
  emt::inject_lora(*model, lc);
  {
    torch::NoGradGuard ng;
    for (auto& p : model->named_parameters())
      if (emt::is_lora_parameter(p.key())) p.value().normal_(0, 0.5);
    for (auto& p : model->multi_modal_projector->parameters()) p.add_(0.1);
  }
  emt::LoraSaveOptions so2;
  so2.modules_to_save = {"multi_modal_projector"};
  emt::save_lora_adapter(*model, lc, adapter, so2);
  auto expect_adapted = emt::next_token_logits(model, pixels, ids, torch::ones_like(ids));
  REQUIRE(max_diff(expect_adapted, expect) > 1e-3);  // the adapter changes the answer's distribution
  r = emt_test::run_cli("generate --model " + dir + " --adapter " + adapter + " --image " + png +
                        " --prompt 'what is it?' --max-new-tokens 3 --dump-logits " + dump);
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("LoRA r=4 on 4 layers + projector") != std::string::npos);
  CHECK(max_diff(emt::SafetensorsReader(dump).load("logits"), expect_adapted) <= 1e-5);
  r = emt_test::run_cli("generate --model " + dir + " --adapter " + dir + " --image " + png + " --prompt hi");
  CHECK(r.code == 2);
  CHECK(r.output.find("neither adapter_config.json nor mm_projector.safetensors") != std::string::npos);
  CHECK(emt_test::run_cli("generate --model " + dir + " --adapter x --image " + png + " --prompt hi").code == 2);
  CHECK(emt_test::run_cli("generate --model " + dir + "/nothing --image " + png + " --prompt hi").code == 2);
}
