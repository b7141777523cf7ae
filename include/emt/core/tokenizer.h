// Tokenizer interface. SentencePiece (LLaMA tokenizer.model, and training new BPE models for the tiny model) is
// reached through a dlopen'ed plug-in, because its bundled protobuf cannot share a process image with LibTorch's.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace emt {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Text -> ids. Special-token strings registered with add_special_token (e.g. "<image>") map to their own id.
  virtual std::vector<int64_t> encode(const std::string& text, bool add_bos = false, bool add_eos = false) const = 0;
  virtual std::string decode(const std::vector<int64_t>& ids, bool skip_special = true) const = 0;
  virtual int64_t vocab_size() const = 0;  // including added special tokens
  virtual int64_t bos_id() const = 0;
  virtual int64_t eos_id() const = 0;
  virtual int64_t pad_id() const = 0;
  // Registers (or finds) a special token such as "<image>" or "<pad>"; returns its id.
  virtual int64_t add_special_token(const std::string& token) = 0;
  virtual int64_t special_token_id(const std::string& token) const = 0;  // -1 if unknown
};

// Loads a SentencePiece model file (e.g. LLaMA's tokenizer.model). IoError naming the path if missing/corrupt.
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path);

struct SentencePieceTrainOptions {
  int64_t vocab_size = 512;
  std::string model_type = "bpe";  // bpe | unigram
  double character_coverage = 1.0;
  std::vector<std::string> user_defined_symbols;  // e.g. "<image>"
  // SentencePiece splits where the Unicode script changes (letters | punctuation), so "circle," is two pieces;
  // false lets such a word become one piece (shorter label lists in prompts).
  bool split_by_unicode_script = true;
  // Special ids (SentencePiece's flags; -1 disables a special). The tiny model moves eos off id 2 because HF's
  // CLIP text tower treats eos_token_id == 2 as "pool at the argmax id" (its legacy rule).
  int64_t unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;
};
// Trains a model on the lines of `corpus_path` and writes `<model_prefix>.model` (+ .vocab). Deterministic.
void train_sentencepiece(const std::string& corpus_path, const std::string& model_prefix,
                         const SentencePieceTrainOptions& opts);

// HF model directory: tokenizer.model plus added tokens from added_tokens.json / tokenizer_config.json.
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& model_dir);

// CLIP's byte-level BPE (vocab.json + merges.txt): lower-cased, `</w>` word ends, <|startoftext|>/<|endoftext|>.
std::unique_ptr<Tokenizer> load_clip_bpe(const std::string& vocab_json, const std::string& merges_txt);

}  // namespace emt
