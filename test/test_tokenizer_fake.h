// Test tokenizers' shared part: ids 0 = pad, 1 = bos, 2 = eos, 3 = unk, then the subclass's own vocabulary of
// base_vocab() ids, then special tokens in the order they are added.
#pragma once
#include <emt/core/tokenizer.h>

#include <map>
#include <string>

namespace emt_test {

class FakeTokenizerBase : public emt::Tokenizer {
 public:
  int64_t vocab_size() const override { return base_vocab() + static_cast<int64_t>(special_.size()); }
  int64_t bos_id() const override { return 1; }
  int64_t eos_id() const override { return 2; }
  int64_t pad_id() const override { return 0; }
  int64_t add_special_token(const std::string& t) override {
    auto it = special_.find(t);
    if (it != special_.end()) return it->second;
    return special_[t] = vocab_size();
  }
  int64_t special_token_id(const std::string& t) const override {
    auto it = special_.find(t);
    return it == special_.end() ? -1 : it->second;
  }

 protected:
  virtual int64_t base_vocab() const = 0;  // ids below this (the 4 reserved ones included) are the subclass's
  std::map<std::string, int64_t> special_;
};

}  // namespace emt_test
