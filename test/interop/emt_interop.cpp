// emt's side of the interop checks (scripts/interop.sh): loads what the Python libraries wrote, runs emt's
// library on it and writes plain files back (safetensors, JSON) for test/interop/check.py to compare.
// Not a ctest test: it needs files that only the pinned Python references can make.
#include <emt/adapters/lora.h>
#include <emt/adapters/peft.h>
#include <emt/core/error.h>
#include <emt/core/generate.h>
#include <emt/core/hf_checkpoint.h>
#include <emt/core/llava.h>
#include <emt/core/runtime.h>
#include <emt/core/safetensors.h>
#include <emt/core/tokenizer.h>
#include <torch/torch.h>

#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace {

using json = nlohmann::json;
using Args = std::vector<std::string>;

json read_json(const std::string& path) { return json::parse(emt::read_file(path)); }

// Generated rows (different lengths) as one [B, max_len] tensor padded with -1.
torch::Tensor pad_rows(const std::vector<std::vector<int64_t>>& rows) {
  size_t width = 0;
  for (const auto& r : rows) width = std::max(width, r.size());
  auto out = torch::full({static_cast<int64_t>(rows.size()), static_cast<int64_t>(width)}, -1, torch::kLong);
  for (size_t i = 0; i < rows.size(); ++i)
    for (size_t j = 0; j < rows[i].size(); ++j) out[i][j] = rows[i][j];
  return out;
}

// Everything a check compares for one model on one input file:
//   full.*  (equal-length rows, no padding): logits [B, T', V] of forward()
//   gen.*   (left-padded rows): next-token logits [B, V] and the greedy tokens.
emt::NamedTensors run_model(emt::LlavaModel& model, const std::string& inputs) {
  emt::SafetensorsReader in(inputs);
  torch::NoGradGuard ng;
  model->eval();
  emt::NamedTensors out;
  auto full = model->forward(in.load("full.pixel_values"), in.load("full.input_ids"), in.load("full.attention_mask"));
  out.emplace_back("full.logits", full.logits.to(torch::kFloat32).contiguous());
  auto px = in.load("gen.pixel_values"), ids = in.load("gen.input_ids"), mask = in.load("gen.attention_mask");
  out.emplace_back("gen.next_logits", emt::next_token_logits(model, px, ids, mask).contiguous());
  emt::GenerateOptions g;
  g.max_new_tokens = in.load("gen.max_new_tokens").item<int64_t>();
  g.eos_id = in.load("gen.eos").item<int64_t>();
  out.emplace_back("gen.tokens", pad_rows(emt::generate(model, px, ids, mask, g)));
  return out;
}

// llava MODEL_DIR INPUTS OUT [ADAPTER_DIR [merged_dir]]: outputs of the model (with the adapter, if given); with
// merged_dir the adapter is merged and the merged model saved there (old key style) before the outputs are taken.
int cmd_llava(const Args& a) {
  if (a.size() < 3) throw emt::ConfigError("usage: llava MODEL_DIR INPUTS OUT [ADAPTER_DIR [MERGED_DIR]]");
  auto model = emt::load_llava(a[0]);
  if (a.size() >= 4) std::cerr << "[interop] applied " << emt::apply_checkpoint_dir(model, a[3]) << "\n";
  if (a.size() >= 5) {
    emt::merge_lora(*model);
    emt::save_llava(model, a[4]);
  }
  emt::save_safetensors(a[2], run_model(model, a[1]));
  return 0;
}

// save MODEL_DIR OUT_DIR STYLE [MAX_SHARD_BYTES]: load_llava + save_llava (what transformers must read back).
int cmd_save(const Args& a) {
  if (a.size() < 3) throw emt::ConfigError("usage: save MODEL_DIR OUT_DIR old|new [MAX_SHARD_BYTES]");
  auto model = emt::load_llava(a[0]);
  emt::save_llava(model, a[1], a[2], a.size() > 3 ? std::stoull(a[3]) : (5ull << 30));
  return 0;
}

// train-lora MODEL_DIR INPUTS SETTINGS.json OUT_DIR: attaches LoRA as SETTINGS says, trains deltas and projector
// for a few Adam steps on the next-token loss of the full.* inputs, saves a PEFT directory.
int cmd_train_lora(const Args& a) {
  if (a.size() < 4) throw emt::ConfigError("usage: train-lora MODEL_DIR INPUTS SETTINGS.json OUT_DIR");
  auto model = emt::load_llava(a[0]);
  auto s = read_json(a[2]);
  emt::LoraConfig cfg;
  cfg.r = s.value("r", 4);
  cfg.alpha = s.value("alpha", 8.0);
  cfg.dropout = s.value("dropout", 0.0);
  cfg.use_rslora = s.value("use_rslora", false);
  if (s.contains("target_modules")) cfg.target_modules = s["target_modules"].get<std::vector<std::string>>();
  cfg.target_regex = s.value("target_regex", std::string());
  if (s.contains("rank_pattern")) cfg.rank_pattern = s["rank_pattern"].get<std::map<std::string, int64_t>>();
  if (s.contains("alpha_pattern")) cfg.alpha_pattern = s["alpha_pattern"].get<std::map<std::string, double>>();
  torch::manual_seed(s.value("seed", 0));
  emt::inject_lora(*model, cfg);
  std::vector<torch::Tensor> params;
  for (auto& p : model->named_parameters(true)) {
    bool projector = p.key().rfind("multi_modal_projector.", 0) == 0;
    if (projector) p.value().set_requires_grad(true);
    if (projector || emt::is_lora_parameter(p.key())) params.push_back(p.value());
  }
  emt::SafetensorsReader in(a[1]);
  auto px = in.load("full.pixel_values"), ids = in.load("full.input_ids"), mask = in.load("full.attention_mask");
  auto labels = ids.clone();
  labels.masked_fill_(ids.eq(model->image_token_id), -100);
  model->train();
  torch::optim::Adam opt(params, torch::optim::AdamOptions(s.value("lr", 0.05)));
  for (int step = 0; step < s.value("steps", 4); ++step) {
    opt.zero_grad();
    auto loss = model->forward(px, ids, mask, labels).loss;
    loss.backward();
    opt.step();
    std::cerr << "[interop] train-lora step " << step << " loss " << loss.item<double>() << "\n";
  }
  emt::LoraSaveOptions so;
  so.key_style = s.value("key_style", std::string("old"));
  so.modules_to_save = {"multi_modal_projector"};
  so.dtype = s.value("dtype", std::string());
  emt::save_lora_adapter(*model, cfg, a[3], so);
  return 0;
}

// tokenize spm|clip SOURCE... CORPUS.json OUT.json: ids of every corpus line (spm: an HF tokenizer directory,
// BOS added as HF's LLaMA tokenizers do; clip: vocab.json merges.txt, without start/end tokens).
int cmd_tokenize(const Args& a) {
  if (a.size() < 4) throw emt::ConfigError("usage: tokenize spm DIR CORPUS OUT | tokenize clip VOCAB MERGES CORPUS OUT");
  std::unique_ptr<emt::Tokenizer> tok;
  size_t next = 2;
  if (a[0] == "spm") {
    tok = emt::load_hf_tokenizer(a[1]);
  } else if (a[0] == "clip" && a.size() >= 5) {
    tok = emt::load_clip_bpe(a[1], a[2]);
    next = 3;
  } else {
    throw emt::ConfigError("tokenize: unknown kind '" + a[0] + "' (spm or clip)");
  }
  json out = json::array();
  for (const auto& line : read_json(a[next])) {
    auto ids = tok->encode(line.get<std::string>(), /*add_bos=*/a[0] == "spm");
    out.push_back({{"ids", ids}, {"decoded", tok->decode(ids, /*skip_special=*/false)}});
  }
  emt::write_file_atomic(a[next + 1], out.dump() + "\n");
  return 0;
}

// The values every dtype check uses, shared with test/interop/check.py (expected_tensor()).
torch::Tensor pattern(const std::string& dtype, int64_t n) {
  auto x = torch::arange(n, torch::kFloat64);
  if (dtype == "BOOL") return x.remainder(3).eq(1);
  if (dtype == "U8") return x.mul(37).remainder(256).to(torch::kUInt8);
  if (dtype == "I8") return x.mul(37).remainder(256).sub(128).to(torch::kChar);
  if (dtype == "I16") return x.mul(4099).sub(30000).to(torch::kShort);
  if (dtype == "I32") return x.mul(1e8).sub(7e8).to(torch::kInt);
  if (dtype == "I64") return x.mul(1e9).sub(3e9).to(torch::kLong);
  auto f = x.mul(0.37).sub(5.0).mul(x.remainder(2).mul(2).sub(1));  // alternating signs, many exponents
  auto t = dtype == "F64" ? torch::kFloat64 : dtype == "F32" ? torch::kFloat32 : dtype == "F16" ? torch::kHalf : torch::kBFloat16;
  return f.to(t);
}

const char* kDtypes[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"};

// st-write OUT: one tensor per dtype (name = dtype, shape [3, 5]) plus a 0-d and an empty one, with metadata.
int cmd_st_write(const Args& a) {
  if (a.empty()) throw emt::ConfigError("usage: st-write OUT");
  emt::NamedTensors t;
  for (const char* d : kDtypes) t.emplace_back(d, pattern(d, 15).reshape({3, 5}));
  t.emplace_back("scalar_bf16", pattern("BF16", 2).narrow(0, 1, 1).reshape({}));
  t.emplace_back("empty_f32", torch::zeros({0, 4}));
  emt::save_safetensors(a[0], t, {{"format", "pt"}, {"writer", "emt"}});
  return 0;
}

// st-copy IN OUT: every tensor read by emt's reader, written again by emt's writer (same names and metadata).
int cmd_st_copy(const Args& a) {
  if (a.size() < 2) throw emt::ConfigError("usage: st-copy IN OUT");
  emt::SafetensorsReader r(a[0]);
  emt::NamedTensors t;
  for (const auto& n : r.names()) t.emplace_back(n, r.load(n));
  emt::save_safetensors(a[1], t, r.metadata());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<int(const Args&)>> commands = {
      {"llava", cmd_llava},       {"save", cmd_save},         {"train-lora", cmd_train_lora},
      {"tokenize", cmd_tokenize}, {"st-write", cmd_st_write}, {"st-copy", cmd_st_copy}};
  if (argc < 2 || !commands.count(argv[1])) {
    std::cerr << "usage: emt_interop llava|save|train-lora|tokenize|st-write|st-copy ARGS...\n";
    return 2;
  }
  try {
    return commands.at(argv[1])(Args(argv + 2, argv + argc));
  } catch (const std::exception& e) {
    std::cerr << "emt_interop " << argv[1] << ": " << e.what() << "\n";
    return 1;
  }
}
