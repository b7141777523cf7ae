// CLIP's byte-level BPE tokenizer (vocab.json + merges.txt): whitespace cleanup and lower-casing, CLIP's
// pre-tokenizer pattern, bytes mapped to printable code points, `</w>` word ends, merges applied by rank.
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/core/tokenizer.h>

#include <climits>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "tokenizer_detail.h"

namespace emt {
namespace {

const char* kBos = "<|startoftext|>";
const char* kEos = "<|endoftext|>";
const char* kWordEnd = "</w>";

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Decodes one code point at s[i], advancing i. Malformed bytes decode as themselves (one byte each).
uint32_t next_cp(const std::string& s, size_t& i) {
  const auto b = static_cast<unsigned char>(s[i]);
  int len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
  if (len == 0 || i + len > s.size()) return static_cast<unsigned char>(s[i++]);
  uint32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
  for (int k = 1; k < len; ++k) {
    const auto c = static_cast<unsigned char>(s[i + k]);
    if ((c >> 6) != 2) return static_cast<unsigned char>(s[i++]);
    cp = (cp << 6) | (c & 0x3F);
  }
  i += len;
  return cp;
}

bool is_space(uint32_t c) {
  return c == ' ' || (c >= '\t' && c <= '\r') || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
bool is_digit(uint32_t c) { return c >= '0' && c <= '9'; }
// ASCII letters exactly; beyond ASCII every code point outside the common punctuation/symbol blocks counts as a
// letter (an approximation of \p{L} that is exact for the Latin, Greek, Cyrillic and CJK text CLIP labels use).
bool is_letter(uint32_t c) {
  if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
  if (c < 0xC0) return c == 0xAA || c == 0xB5 || c == 0xBA;
  if (c == 0xD7 || c == 0xF7) return false;
  if ((c >= 0x2000 && c <= 0x2BFF) || (c >= 0x3000 && c <= 0x303F) || (c >= 0xFF00 && c <= 0xFF20)) return false;
  return !is_space(c);
}
// Python's str.lower() for the scripts CLIP labels use: Latin (basic, Latin-1, Extended-A, Extended
// Additional), Greek, Cyrillic, Armenian and full-width Latin. Other code points are left as they are.
uint32_t to_lower(uint32_t c) {
  if ((c >= 'A' && c <= 'Z') || (c >= 0xC0 && c <= 0xDE && c != 0xD7)) return c + 0x20;
  if (c < 0x100) return c;
  const bool even = c % 2 == 0;
  if (c >= 0x100 && c <= 0x17F && c != 0x130 && c != 0x131 && c != 0x138 && c != 0x149 && c != 0x17F) {
    // pairs start on even code points except in 0x139..0x148 and 0x179..0x17E, where they start on odd ones
    const bool odd_pairs = (c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E);
    if (c == 0x178) return 0xFF;
    return odd_pairs ? (even ? c : c + 1) : (even ? c + 1 : c);
  }
  if (c >= 0x386 && c <= 0x3AB) {
    if (c == 0x386) return 0x3AC;
    if (c >= 0x388 && c <= 0x38A) return c + 0x25;
    if (c == 0x38C) return 0x3CC;
    if (c == 0x38E || c == 0x38F) return c + 0x3F;
    if (c >= 0x391 && c != 0x3A2) return c + 0x20;
    return c;
  }
  if (c >= 0x400 && c <= 0x40F) return c + 0x50;
  if (c >= 0x410 && c <= 0x42F) return c + 0x20;
  if (((c >= 0x460 && c <= 0x481) || (c >= 0x48A && c <= 0x4BF) || (c >= 0x4D0 && c <= 0x52F)) && even) return c + 1;
  if (c >= 0x531 && c <= 0x556) return c + 0x30;
  if (c >= 0x1E00 && c <= 0x1EFF && even && !(c >= 0x1E96 && c <= 0x1E9F)) return c + 1;
  if (c >= 0xFF21 && c <= 0xFF3A) return c + 0x20;
  return c;
}

// Python's `re.sub(r"\s+", " ", text).strip().lower()` as CLIP applies it before tokenizing.
std::vector<uint32_t> clean(const std::string& text) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < text.size();) {
    uint32_t c = next_cp(text, i);
    if (is_space(c)) {
      if (!out.empty() && out.back() != ' ') out.push_back(' ');
    } else {
      out.push_back(to_lower(c));
    }
  }
  if (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

// CLIP's pattern: 's|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+ (alternatives tried in that order).
std::vector<std::string> pre_tokenize(const std::vector<uint32_t>& cps) {
  static const char* contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  std::vector<std::string> words;
  size_t i = 0;
  const size_t n = cps.size();
  while (i < n) {
    if (is_space(cps[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    if (cps[i] == '\'') {
      for (const char* c : contractions) {
        size_t k = 0;
        while (c[k] && i + k < n && cps[i + k] == static_cast<unsigned char>(c[k])) ++k;
        if (!c[k]) {
          j = i + k;
          break;
        }
      }
    }
    if (j == i) {
      if (is_letter(cps[i])) {
        while (j < n && is_letter(cps[j])) ++j;
      } else if (is_digit(cps[i])) {
        j = i + 1;
      } else {
        while (j < n && !is_space(cps[j]) && !is_letter(cps[j]) && !is_digit(cps[j])) ++j;
      }
    }
    std::string w;
    for (size_t k = i; k < j; ++k) append_utf8(w, cps[k]);
    words.push_back(std::move(w));
    i = j;
  }
  return words;
}

class ClipBpeTokenizer final : public Tokenizer {
 public:
  ClipBpeTokenizer(const std::string& vocab_json, const std::string& merges_txt) : source_(vocab_json) {
    build_byte_map();
    load_vocab(vocab_json);
    load_merges(merges_txt);
    bos_ = add_special_token(kBos);
    eos_ = add_special_token(kEos);
  }

  std::vector<int64_t> encode(const std::string& text, bool add_bos, bool add_eos) const override {
    std::vector<int64_t> out;
    if (add_bos) out.push_back(bos_);
    for (const auto& seg : specials_.split(text)) {
      if (seg.id >= 0) {
        out.push_back(seg.id);
        continue;
      }
      for (const auto& word : pre_tokenize(clean(seg.text)))
        for (const auto& piece : bpe(word)) {
          auto it = vocab_.find(piece);
          out.push_back(it == vocab_.end() ? eos_ : it->second);  // CLIP's unk token is <|endoftext|>
        }
    }
    if (add_eos) out.push_back(eos_);
    return out;
  }

  std::string decode(const std::vector<int64_t>& ids, bool skip_special) const override {
    std::string out, run;
    auto flush = [&] {
      // Pieces are in the printable alphabet: map each code point back to its byte, word ends to spaces.
      size_t pos;
      while ((pos = run.find(kWordEnd)) != std::string::npos) run.replace(pos, 4, " ");
      for (size_t i = 0; i < run.size();) {
        const uint32_t cp = next_cp(run, i);
        auto b = unicode_to_byte_.find(cp);
        if (b != unicode_to_byte_.end()) out += static_cast<char>(b->second);
        else if (cp == ' ') out += ' ';
        else append_utf8(out, cp);
      }
      run.clear();
    };
    for (int64_t id : ids) {
      if (const std::string* s = specials_.text_of(id)) {
        flush();
        if (!skip_special) out += *s;
        continue;
      }
      if (id < 0 || id >= static_cast<int64_t>(id_to_token_.size()) || id_to_token_[id].empty())
        throw FormatError("[tokenizer] " + source_ + ": id " + std::to_string(id) + " is not in the vocabulary");
      run += id_to_token_[id];
    }
    flush();
    const size_t b = out.find_first_not_of(' '), e = out.find_last_not_of(' ');
    return b == std::string::npos ? std::string() : out.substr(b, e - b + 1);
  }

  int64_t vocab_size() const override { return std::max<int64_t>(id_to_token_.size(), specials_.max_id() + 1); }
  int64_t bos_id() const override { return bos_; }
  int64_t eos_id() const override { return eos_; }
  int64_t pad_id() const override { return eos_; }  // CLIP pads with <|endoftext|>

  int64_t add_special_token(const std::string& token) override {
    if (int64_t id = specials_.find(token); id >= 0) return id;
    auto it = vocab_.find(token);
    const int64_t id = it != vocab_.end() ? it->second : vocab_size();
    specials_.add(token, id, "add_special_token");
    return id;
  }
  int64_t special_token_id(const std::string& token) const override { return specials_.find(token); }

 private:
  void build_byte_map() {
    // Printable bytes keep their code point; the others are moved to 256, 257, ... in byte order.
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? b : next++;
      append_utf8(byte_to_unicode_[b], cp);
      unicode_to_byte_[cp] = static_cast<uint8_t>(b);
    }
  }

  void load_vocab(const std::string& path) {
    auto j = nlohmann::json::parse(read_file(path), nullptr, false);
    if (j.is_discarded() || !j.is_object()) throw FormatError("[tokenizer] " + path + ": not a JSON object");
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!it->is_number_unsigned() || it->get<uint64_t>() > INT_MAX)
        throw FormatError("[tokenizer] " + path + ": id of '" + it.key() + "' is not a non-negative integer");
      const int64_t id = it->get<int64_t>();
      vocab_[it.key()] = id;
      if (id >= static_cast<int64_t>(id_to_token_.size())) id_to_token_.resize(id + 1);
      if (!id_to_token_[id].empty())
        throw FormatError("[tokenizer] " + path + ": id " + std::to_string(id) + " used by '" + id_to_token_[id] +
                          "' and '" + it.key() + "'");
      id_to_token_[id] = it.key();
    }
    if (vocab_.empty()) throw FormatError("[tokenizer] " + path + ": empty vocabulary");
  }

  void load_merges(const std::string& path) {
    const std::string text = read_file(path);
    size_t pos = 0;
    int64_t line_no = 0, rank = 0;
    while (pos < text.size()) {
      size_t nl = text.find('\n', pos);
      if (nl == std::string::npos) nl = text.size();
      std::string line = text.substr(pos, nl - pos);
      pos = nl + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
      const size_t sp = line.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 >= line.size() || line.find(' ', sp + 1) != std::string::npos)
        throw FormatError("[tokenizer] " + path + ":" + std::to_string(line_no) + ": expected 'left right' (got '" +
                          line + "')");
      ranks_.emplace(line, rank++);
    }
  }

  // Splits a pre-token into code-point symbols (last one gets `</w>`) and merges the best-ranked pair until none
  // of the adjacent pairs is a merge.
  std::vector<std::string> bpe(const std::string& word) const {
    std::vector<std::string> sym;
    for (unsigned char b : word) {
      const std::string& u = byte_to_unicode_[b];
      sym.push_back(u);
    }
    if (sym.empty()) return sym;
    sym.back() += kWordEnd;
    while (sym.size() > 1) {
      int64_t best = -1;
      size_t at = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = ranks_.find(sym[i] + " " + sym[i + 1]);
        if (it != ranks_.end() && (best < 0 || it->second < best)) best = it->second, at = i;
      }
      if (best < 0) break;
      const std::string a = sym[at], b = sym[at + 1];
      std::vector<std::string> merged;
      for (size_t i = 0; i < sym.size();) {
        if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
          merged.push_back(a + b);
          i += 2;
        } else {
          merged.push_back(sym[i++]);
        }
      }
      sym.swap(merged);
    }
    return sym;
  }

  std::string source_;
  std::string byte_to_unicode_[256];
  std::unordered_map<uint32_t, uint8_t> unicode_to_byte_;
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::string, int64_t> ranks_;
  detail::SpecialTokens specials_;
  int64_t bos_ = -1, eos_ = -1;
};

}  // namespace

std::unique_ptr<Tokenizer> load_clip_bpe(const std::string& vocab_json, const std::string& merges_txt) {
  return std::make_unique<ClipBpeTokenizer>(vocab_json, merges_txt);
}

}  // namespace emt
