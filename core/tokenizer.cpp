// SentencePiece tokenizer reached through the dlopen'ed plug-in libemt_spm.so (C ABI, see
// core/plugins/spm_plugin.cpp), plus HF added tokens and training. Nothing here links sentencepiece.
#include <dlfcn.h>
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/core/tokenizer.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>

#include "tokenizer_detail.h"

namespace emt {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr int kPluginAbi = 1;
const char* kPluginFile = "libemt_spm.so";

struct SpmApi {
  int (*abi_version)();
  const char* (*last_error)();
  void (*free_buffer)(void*);
  void* (*load)(const char*);
  void (*free)(void*);
  int (*encode)(void*, const char*, int, int**, int*);
  int (*decode)(void*, const int*, int, char**, int*);
  int (*vocab_size)(void*);
  int (*bos_id)(void*);
  int (*eos_id)(void*);
  int (*pad_id)(void*);
  int (*unk_id)(void*);
  int (*piece_to_id)(void*, const char*);
  int (*id_to_piece)(void*, int, char*, int);
  int (*train)(const char*);
};

// Where libemt itself lives: the build tree and the install tree both keep the plug-in next to it.
std::string own_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&load_sentencepiece), &info) == 0 || !info.dli_fname) return {};
  return fs::path(info.dli_fname).parent_path().string();
}

template <typename F>
void bind(void* lib, const std::string& path, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn) throw IoError("[tokenizer] plug-in " + path + " lacks symbol " + name);
}

SpmApi open_plugin(const std::string& path) {
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer refuses RTLD_DEEPBIND. A fresh link namespace isolates the plug-in (built without
  // sanitizers, see CMakeLists.txt) and its protobuf even more completely; it owns its own libc heap, which
  // the C ABI allows: every buffer it returns is released through emt_spm_free_buffer.
  void* lib = dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
#else
  // DEEPBIND: the plug-in's own protobuf must win over LibTorch's already-loaded copy.
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
#endif
  if (!lib) throw IoError(dlerror());
  SpmApi a{};
  bind(lib, path, "emt_spm_abi_version", a.abi_version);
  if (a.abi_version() != kPluginAbi)
    throw IoError("[tokenizer] plug-in " + path + " has ABI version " + std::to_string(a.abi_version()) +
                  ", expected " + std::to_string(kPluginAbi));
  bind(lib, path, "emt_spm_last_error", a.last_error);
  bind(lib, path, "emt_spm_free_buffer", a.free_buffer);
  bind(lib, path, "emt_spm_load", a.load);
  bind(lib, path, "emt_spm_free", a.free);
  bind(lib, path, "emt_spm_encode", a.encode);
  bind(lib, path, "emt_spm_decode", a.decode);
  bind(lib, path, "emt_spm_vocab_size", a.vocab_size);
  bind(lib, path, "emt_spm_bos_id", a.bos_id);
  bind(lib, path, "emt_spm_eos_id", a.eos_id);
  bind(lib, path, "emt_spm_pad_id", a.pad_id);
  bind(lib, path, "emt_spm_unk_id", a.unk_id);
  bind(lib, path, "emt_spm_piece_to_id", a.piece_to_id);
  bind(lib, path, "emt_spm_id_to_piece", a.id_to_piece);
  bind(lib, path, "emt_spm_train", a.train);
  return a;  // never dlclose'd: handles and buffers from it may live until exit
}

// Loaded once per process. Order: $EMT_SPM_PLUGIN (exclusive when set), next to libemt, the install dir.
const SpmApi& spm_api() {
  static std::mutex mu;
  static std::unique_ptr<SpmApi> api;
  std::lock_guard<std::mutex> lock(mu);
  if (api) return *api;
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("EMT_SPM_PLUGIN"); env && *env) {
    candidates.push_back(env);
  } else {
    if (auto d = own_dir(); !d.empty()) candidates.push_back((fs::path(d) / kPluginFile).string());
    candidates.push_back((fs::path(EMT_PLUGIN_INSTALL_DIR) / kPluginFile).string());
  }
  std::string tried;
  for (const auto& c : candidates) {
    try {
      api = std::make_unique<SpmApi>(open_plugin(c));
      return *api;
    } catch (const IoError& e) {
      tried += "\n  " + c + ": " + e.what();
    }
  }
  throw IoError("[tokenizer] cannot load the SentencePiece plug-in " + std::string(kPluginFile) +
                " (set EMT_SPM_PLUGIN to its path); tried:" + tried);
}

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(const SpmApi& api, void* handle, std::string path)
      : api_(api), h_(handle, api.free), path_(std::move(path)) {
    base_size_ = api_.vocab_size(handle);
    bos_ = api_.bos_id(handle);
    eos_ = api_.eos_id(handle);
    pad_ = api_.pad_id(handle);
    unk_ = api_.unk_id(handle);
  }

  std::vector<int64_t> encode(const std::string& text, bool add_bos, bool add_eos) const override {
    std::vector<int64_t> out;
    if (add_bos) out.push_back(require(bos_, "bos"));
    // Each plain run is encoded on its own, as HF's slow LLaMA tokenizer (and LLaVA's image-token splitter) do.
    for (const auto& seg : specials_.split(text)) {
      if (seg.id >= 0) {
        out.push_back(seg.id);
        continue;
      }
      int* ids = nullptr;
      int n = 0;
      if (api_.encode(h_.get(), seg.text.data(), static_cast<int>(seg.text.size()), &ids, &n) != 0)
        throw FormatError("[tokenizer] " + path_ + ": encoding failed: " + api_.last_error());
      out.insert(out.end(), ids, ids + n);
      api_.free_buffer(ids);
    }
    if (add_eos) out.push_back(require(eos_, "eos"));
    return out;
  }

  std::string decode(const std::vector<int64_t>& ids, bool skip_special) const override {
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      char* text = nullptr;
      int len = 0;
      if (api_.decode(h_.get(), run.data(), static_cast<int>(run.size()), &text, &len) != 0)
        throw FormatError("[tokenizer] " + path_ + ": decoding failed: " + api_.last_error());
      out.append(text, static_cast<size_t>(len));
      api_.free_buffer(text);
      run.clear();
    };
    const int64_t vs = vocab_size();
    for (int64_t id : ids) {
      if (id < 0 || id >= vs)
        throw FormatError("[tokenizer] " + path_ + ": id " + std::to_string(id) + " out of range [0, " +
                          std::to_string(vs) + ")");
      const std::string* special = specials_.text_of(id);
      const bool control = id == bos_ || id == eos_ || id == pad_;
      if (!special && !control && id >= base_size_)
        throw FormatError("[tokenizer] " + path_ + ": id " + std::to_string(id) + " is not assigned to any token");
      if (!special && !control) {
        run.push_back(static_cast<int>(id));
        continue;
      }
      flush();
      if (!skip_special) out += special ? *special : piece(id);
    }
    flush();
    return out;
  }

  int64_t vocab_size() const override { return std::max(base_size_, specials_.max_id() + 1); }
  int64_t bos_id() const override { return bos_; }
  int64_t eos_id() const override { return eos_; }
  int64_t pad_id() const override {
    if (int64_t p = specials_.find("<pad>"); p >= 0) return p;
    if (pad_ >= 0) return pad_;
    return unk_ >= 0 ? unk_ : eos_;
  }

  int64_t add_special_token(const std::string& token) override {
    if (int64_t id = specials_.find(token); id >= 0) return id;
    int64_t id = api_.piece_to_id(h_.get(), token.c_str());
    if (id < 0) id = vocab_size();
    specials_.add(token, id, "add_special_token");
    return id;
  }

  int64_t special_token_id(const std::string& token) const override { return specials_.find(token); }

  // HF added tokens carry fixed ids, which must agree with the model wherever the model already has that id.
  void add_with_id(const std::string& token, int64_t id, const std::string& source) {
    if (id < 0) throw FormatError("[tokenizer] " + source + ": token '" + token + "' has negative id");
    if (id < base_size_ && piece(id) != token)
      throw FormatError("[tokenizer] " + source + ": token '" + token + "' given id " + std::to_string(id) +
                        ", which the model assigns to '" + piece(id) + "'");
    specials_.add(token, id, source);
  }

  void add_alias(const std::string& token, int64_t id, const std::string& source) { specials_.alias(token, id, source); }

  const std::string& path() const { return path_; }

 private:
  int64_t require(int64_t id, const char* what) const {
    if (id < 0) throw ConfigError("[tokenizer] " + path_ + ": the model has no " + what + " token");
    return id;
  }

  std::string piece(int64_t id) const {
    char buf[256];
    int n = api_.id_to_piece(h_.get(), static_cast<int>(id), buf, sizeof buf);
    if (n < 0) return {};
    if (n < static_cast<int>(sizeof buf)) return std::string(buf, static_cast<size_t>(n));
    std::string big(static_cast<size_t>(n) + 1, '\0');
    api_.id_to_piece(h_.get(), static_cast<int>(id), big.data(), n + 1);
    big.resize(static_cast<size_t>(n));
    return big;
  }

  const SpmApi& api_;
  std::unique_ptr<void, void (*)(void*)> h_;
  std::string path_;
  int64_t base_size_ = 0, bos_ = -1, eos_ = -1, pad_ = -1, unk_ = -1;
  detail::SpecialTokens specials_;
};

std::unique_ptr<SentencePieceTokenizer> open_spm(const std::string& model_path) {
  std::error_code ec;
  if (!fs::is_regular_file(model_path, ec))
    throw IoError("[tokenizer] SentencePiece model " + model_path + " does not exist or is not a file");
  const SpmApi& api = spm_api();
  void* h = api.load(model_path.c_str());
  if (!h)
    throw IoError("[tokenizer] " + model_path + " is not a valid SentencePiece model: " + api.last_error());
  return std::make_unique<SentencePieceTokenizer>(api, h, model_path);
}

json read_json(const std::string& path) {
  json j = json::parse(read_file(path), nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw FormatError("[tokenizer] " + path + ": not a JSON object");
  return j;
}

int64_t parse_id(const std::string& s, const std::string& source) {
  size_t used = 0;
  int64_t v = -1;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || s.empty() || v < 0)
    throw FormatError("[tokenizer] " + source + ": '" + s + "' is not a token id");
  return v;
}

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path) { return open_spm(model_path); }

void train_sentencepiece(const std::string& corpus_path, const std::string& model_prefix,
                         const SentencePieceTrainOptions& opts) {
  std::error_code ec;
  if (!fs::is_regular_file(corpus_path, ec))
    throw IoError("[tokenizer] training corpus " + corpus_path + " does not exist or is not a file");
  if (opts.model_type != "bpe" && opts.model_type != "unigram")
    throw ConfigError("[tokenizer] model_type must be bpe or unigram (got " + opts.model_type + ")");
  if (opts.vocab_size <= 0) throw ConfigError("[tokenizer] vocab_size must be > 0");
  if (!(opts.character_coverage > 0.0 && opts.character_coverage <= 1.0))
    throw ConfigError("[tokenizer] character_coverage must be in (0, 1]");
  std::string symbols;
  for (const auto& s : opts.user_defined_symbols) {
    if (s.empty() || s.find_first_of(",\n") != std::string::npos)
      throw ConfigError("[tokenizer] user-defined symbol '" + s + "' is empty or contains ',' or a newline");
    symbols += (symbols.empty() ? "" : ",") + s;
  }
  if (corpus_path.find('\n') != std::string::npos || model_prefix.find('\n') != std::string::npos)
    throw ConfigError("[tokenizer] corpus and model paths must not contain newlines");
  if (auto parent = fs::path(model_prefix).parent_path(); !parent.empty()) fs::create_directories(parent, ec);

  // One thread, no sampling or shuffling and a fixed seed: the same corpus always gives the same model.
  // remove_extra_whitespaces=false (as in LLaMA's model) keeps decode(encode(x)) == x around special tokens.
  std::string args = "--input=" + corpus_path + "\n--model_prefix=" + model_prefix +
                     "\n--vocab_size=" + std::to_string(opts.vocab_size) + "\n--model_type=" + opts.model_type +
                     "\n--character_coverage=" + std::to_string(opts.character_coverage) +
                     "\n--num_threads=1\n--input_sentence_size=0\n--shuffle_input_sentence=false"
                     "\n--random_seed=1234\n--remove_extra_whitespaces=false\n--minloglevel=2\n" +
                     "--unk_id=" + std::to_string(opts.unk_id) + "\n--bos_id=" + std::to_string(opts.bos_id) +
                     "\n--eos_id=" + std::to_string(opts.eos_id) + "\n--pad_id=" + std::to_string(opts.pad_id) + "\n" +
                     "--split_by_unicode_script=" + (opts.split_by_unicode_script ? "true" : "false") + "\n";
  if (!symbols.empty()) args += "--user_defined_symbols=" + symbols + "\n";
  const SpmApi& api = spm_api();
  if (api.train(args.c_str()) != 0)
    throw ConfigError("[tokenizer] training on " + corpus_path + " failed: " + api.last_error());
  if (!fs::is_regular_file(model_prefix + ".model", ec))
    throw IoError("[tokenizer] training did not write " + model_prefix + ".model");
}

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& model_dir) {
  const fs::path dir(model_dir);
  auto tok = open_spm((dir / "tokenizer.model").string());
  std::error_code ec;

  // tokenizer_config.json: "added_tokens_decoder": {"32000": {"content": "<image>", ...}, ...}
  const std::string cfg_path = (dir / "tokenizer_config.json").string();
  json cfg;
  if (fs::exists(cfg_path, ec)) {
    cfg = read_json(cfg_path);
    if (auto it = cfg.find("added_tokens_decoder"); it != cfg.end()) {
      if (!it->is_object()) throw FormatError("[tokenizer] " + cfg_path + ": added_tokens_decoder is not an object");
      for (auto e = it->begin(); e != it->end(); ++e) {
        auto content = e->find("content");
        if (!e->is_object() || content == e->end() || !content->is_string())
          throw FormatError("[tokenizer] " + cfg_path + ": added token " + e.key() + " has no string 'content'");
        tok->add_with_id(content->get<std::string>(), parse_id(e.key(), cfg_path), cfg_path);
      }
    }
  }
  // added_tokens.json: {"<image>": 32000, "<pad>": 32001}
  const std::string added_path = (dir / "added_tokens.json").string();
  if (fs::exists(added_path, ec)) {
    json added = read_json(added_path);
    for (auto e = added.begin(); e != added.end(); ++e) {
      if (!e->is_number_integer())
        throw FormatError("[tokenizer] " + added_path + ": id of '" + e.key() + "' is not an integer");
      tok->add_with_id(e.key(), e->get<int64_t>(), added_path);
    }
  }
  // The original LLaVA's image placeholder is <im_patch>; emt's prompts write <image>.
  if (tok->special_token_id("<image>") < 0)
    if (int64_t patch = tok->special_token_id("<im_patch>"); patch >= 0) tok->add_alias("<image>", patch, added_path);
  return tok;
}

}  // namespace emt
