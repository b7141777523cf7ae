// Internal to core/tokenizer.cpp and core/clip_tokenizer.cpp: the registry of runtime-added special tokens
// (HF "added_tokens") and the splitting of text around them before a model tokenizes the rest.
#pragma once
#include <emt/core/error.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace emt::detail {

class SpecialTokens {
 public:
  struct Segment {
    std::string text;
    int64_t id;  // >= 0: a special token; -1: plain text for the model
  };

  // Registers `token` as `id`. Re-registering the same pair is a no-op; any other clash is a FormatError
  // mentioning `source` (the file the pair came from, or "add_special_token").
  void add(const std::string& token, int64_t id, const std::string& source) {
    if (token.empty()) throw ConfigError("[tokenizer] " + source + ": empty special token");
    auto t = by_text_.find(token);
    if (t != by_text_.end() && t->second != id)
      throw FormatError("[tokenizer] " + source + ": special token '" + token + "' given id " + std::to_string(id) +
                        " but it already has id " + std::to_string(t->second));
    auto i = by_id_.find(id);
    if (i != by_id_.end() && i->second != token)
      throw FormatError("[tokenizer] " + source + ": id " + std::to_string(id) + " given to '" + token +
                        "' but it already belongs to '" + i->second + "'");
    by_text_[token] = id;
    by_id_[id] = token;
  }

  // A second text for an existing id: encoding maps it to that id, decoding keeps the id's own text.
  void alias(const std::string& token, int64_t id, const std::string& source) {
    auto t = by_text_.find(token);
    if (t != by_text_.end() && t->second != id)
      throw FormatError("[tokenizer] " + source + ": special token '" + token + "' already has id " +
                        std::to_string(t->second));
    by_text_[token] = id;
  }

  int64_t find(const std::string& token) const {
    auto it = by_text_.find(token);
    return it == by_text_.end() ? -1 : it->second;
  }
  const std::string* text_of(int64_t id) const {
    auto it = by_id_.find(id);
    return it == by_id_.end() ? nullptr : &it->second;
  }
  int64_t max_id() const { return by_id_.empty() ? -1 : by_id_.rbegin()->first; }

  // Cuts `text` into plain runs and special tokens; at one position the longest special token wins.
  std::vector<Segment> split(const std::string& text) const {
    std::vector<Segment> out;
    size_t start = 0, i = 0;
    while (i < text.size()) {
      const std::string* best = nullptr;
      int64_t best_id = -1;
      for (const auto& [tok, id] : by_text_)
        if (text.compare(i, tok.size(), tok) == 0 && (!best || tok.size() > best->size())) best = &tok, best_id = id;
      if (!best) {
        ++i;
        continue;
      }
      if (i > start) out.push_back({text.substr(start, i - start), -1});
      out.push_back({*best, best_id});
      i += best->size();
      start = i;
    }
    if (start < text.size()) out.push_back({text.substr(start), -1});
    return out;
  }

 private:
  std::map<std::string, int64_t> by_text_;
  std::map<int64_t, std::string> by_id_;
};

}  // namespace emt::detail
