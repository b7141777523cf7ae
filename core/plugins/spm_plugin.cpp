// SentencePiece plug-in: a plain C ABI around libsentencepiece, loaded by core/tokenizer.cpp with
// dlopen(RTLD_LOCAL | RTLD_DEEPBIND) so that sentencepiece's bundled protobuf never meets LibTorch's.
// Nothing but ints, char pointers and opaque handles crosses this boundary; buffers the plug-in allocates are
// released with emt_spm_free_buffer. Errors: functions return a negative value / null and the message is
// available from emt_spm_last_error() on the same thread.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

thread_local std::string g_last_error;

int set_error(const std::string& msg) {
  g_last_error = msg;
  return -1;
}

sentencepiece::SentencePieceProcessor* proc(void* h) { return static_cast<sentencepiece::SentencePieceProcessor*>(h); }

}  // namespace

extern "C" {

// Bumped whenever a signature below changes; the loader refuses a plug-in with another version.
int emt_spm_abi_version() { return 1; }

const char* emt_spm_last_error() { return g_last_error.c_str(); }

void emt_spm_free_buffer(void* p) { std::free(p); }

// Returns an opaque handle, or null (see emt_spm_last_error).
void* emt_spm_load(const char* path) {
  try {
    auto* sp = new sentencepiece::SentencePieceProcessor();
    const auto st = sp->Load(path);
    if (!st.ok()) {
      set_error(st.ToString());
      delete sp;
      return nullptr;
    }
    return sp;
  } catch (const std::exception& e) {
    set_error(e.what());
    return nullptr;
  }
}

void emt_spm_free(void* h) { delete proc(h); }

// Encodes `len` bytes of `text`. On success *out_ids is a malloc'ed array of *out_n ints (free with
// emt_spm_free_buffer; null when *out_n == 0) and 0 is returned.
int emt_spm_encode(void* h, const char* text, int len, int** out_ids, int* out_n) {
  try {
    *out_ids = nullptr;
    *out_n = 0;
    std::vector<int> ids;
    const auto st = proc(h)->Encode(std::string(text, static_cast<size_t>(len)), &ids);
    if (!st.ok()) return set_error(st.ToString());
    if (ids.empty()) return 0;
    int* buf = static_cast<int*>(std::malloc(ids.size() * sizeof(int)));
    if (!buf) return set_error("out of memory");
    std::memcpy(buf, ids.data(), ids.size() * sizeof(int));
    *out_ids = buf;
    *out_n = static_cast<int>(ids.size());
    return 0;
  } catch (const std::exception& e) {
    return set_error(e.what());
  }
}

// Decodes ids into a malloc'ed, NUL-terminated string of *out_len bytes (free with emt_spm_free_buffer).
int emt_spm_decode(void* h, const int* ids, int n, char** out, int* out_len) {
  try {
    *out = nullptr;
    *out_len = 0;
    const int size = proc(h)->GetPieceSize();
    for (int i = 0; i < n; ++i)
      if (ids[i] < 0 || ids[i] >= size)
        return set_error("id " + std::to_string(ids[i]) + " out of range [0, " + std::to_string(size) + ")");
    std::string text;
    const auto st = proc(h)->Decode(std::vector<int>(ids, ids + n), &text);
    if (!st.ok()) return set_error(st.ToString());
    char* buf = static_cast<char*>(std::malloc(text.size() + 1));
    if (!buf) return set_error("out of memory");
    std::memcpy(buf, text.data(), text.size());
    buf[text.size()] = '\0';
    *out = buf;
    *out_len = static_cast<int>(text.size());
    return 0;
  } catch (const std::exception& e) {
    return set_error(e.what());
  }
}

int emt_spm_vocab_size(void* h) { return proc(h)->GetPieceSize(); }
int emt_spm_bos_id(void* h) { return proc(h)->bos_id(); }
int emt_spm_eos_id(void* h) { return proc(h)->eos_id(); }
int emt_spm_pad_id(void* h) { return proc(h)->pad_id(); }
int emt_spm_unk_id(void* h) { return proc(h)->unk_id(); }

// Returns the id of `piece` if it is in the vocabulary, else -1 (sentencepiece itself would answer unk).
int emt_spm_piece_to_id(void* h, const char* piece) {
  const int id = proc(h)->PieceToId(piece);
  if (id < 0 || id >= proc(h)->GetPieceSize()) return -1;
  return proc(h)->IdToPiece(id) == piece ? id : -1;
}

// Copies the piece for `id` into `out` (capacity `cap`, NUL-terminated). Returns the piece length, or -1 if the id
// is out of range; a return value >= cap means the buffer was too small and nothing was copied.
int emt_spm_id_to_piece(void* h, int id, char* out, int cap) {
  if (id < 0 || id >= proc(h)->GetPieceSize()) return set_error("id " + std::to_string(id) + " out of range");
  const std::string& p = proc(h)->IdToPiece(id);
  const int n = static_cast<int>(p.size());
  if (n < cap) {
    std::memcpy(out, p.data(), p.size());
    out[n] = '\0';
  }
  return n;
}

// Trains a model. `args` holds one `--key=value` flag per line (spm_train's flag names); a value may contain
// spaces, so paths need no quoting. Two extra keys: random_seed (seeds sentencepiece's RNG) and minloglevel.
int emt_spm_train(const char* args) {
  try {
    std::unordered_map<std::string, std::string> kw;
    std::string all(args), line;
    size_t pos = 0;
    while (pos <= all.size()) {
      size_t nl = all.find('\n', pos);
      if (nl == std::string::npos) nl = all.size();
      line = all.substr(pos, nl - pos);
      pos = nl + 1;
      if (line.empty()) continue;
      if (line.rfind("--", 0) == 0) line = line.substr(2);
      const size_t eq = line.find('=');
      if (eq == std::string::npos) return set_error("training flag without '=': " + line);
      kw[line.substr(0, eq)] = line.substr(eq + 1);
    }
    auto seed = kw.find("random_seed");
    if (seed != kw.end()) {
      sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned>(std::stoul(seed->second)));
      kw.erase(seed);
    }
    const auto st = sentencepiece::SentencePieceTrainer::Train(kw);
    if (!st.ok()) return set_error(st.ToString());
    return 0;
  } catch (const std::exception& e) {
    return set_error(e.what());
  }
}

}  // extern "C"
