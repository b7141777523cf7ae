// The data loader: deterministic order and sharding, prompt/answer tokenization with label masking, padding, and
// background decode + preprocess threads with a bounded prefetch window.
#include <emt/core/conversation.h>
#include <emt/core/error.h>
#include <emt/core/loader.h>
#include "core/logging.h"

#include <torch/torch.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

namespace emt {

namespace {

struct Slot {
  Batch batch;
  std::vector<std::string> bad;  // why each skipped image was skipped (skip_bad)
  std::exception_ptr error;
};

}  // namespace

struct DataLoader::Impl {
  std::shared_ptr<ImageDataset> ds;
  std::shared_ptr<Tokenizer> tok;
  PromptSpec spec;
  LoaderOptions opts;
  int64_t image_id = -1;
  std::vector<std::vector<int64_t>> prompt_ids;  // per question
  std::vector<std::vector<int64_t>> answer_ids;  // per class
  std::mutex tok_mutex;                          // tokenizers are not promised to be thread-safe

  int64_t shard_size = 0;
  int64_t batches = 0;
  int64_t epoch = 0;
  std::vector<int64_t> order;  // this rank's samples for the current epoch
  int64_t skipped = 0;  // counted when a batch is consumed, so prefetched-then-discarded work never counts

  std::mutex m;
  std::condition_variable cv_ready, cv_space;
  std::map<int64_t, Slot> ready;
  int64_t next_build = 0, next_consume = 0;
  bool stop = false;
  bool started = false;  // workers launch on the first next() of an epoch
  std::vector<std::thread> threads;

  std::vector<int64_t> encode_prompt(const std::string& question) {
    std::string text = render_prompt(opts.conversation, opts.system, question);
    std::vector<int64_t> ids;
    {
      std::lock_guard<std::mutex> l(tok_mutex);
      ids = tok->encode(text, /*add_bos=*/true);
    }
    auto n = std::count(ids.begin(), ids.end(), image_id);
    if (n != 1)
      throw FormatError(fmt::format("[loader] prompt must hold exactly one <image> token (id {}), found {} in '{}'",
                                    image_id, n, text));
    return ids;
  }

  std::vector<int64_t> encode_answer(const std::string& answer) {
    std::lock_guard<std::mutex> l(tok_mutex);
    return emt::encode_answer(*tok, opts.conversation, answer);
  }

  void compute_order() {
    const int64_t n = ds->size();
    order.clear();
    std::vector<int64_t> global =
        opts.shuffle ? seeded_permutation(n, mix_seed(opts.seed, static_cast<uint64_t>(epoch))) : [&] {
          std::vector<int64_t> v(static_cast<size_t>(n));
          for (int64_t i = 0; i < n; ++i) v[i] = i;
          return v;
        }();
    const int64_t w = opts.world_size;
    if (opts.shard_batches) {  // whole batches are dealt out; every rank sees the one global order
      order = std::move(global);
      return;
    }
    if (w > 1 && opts.even_shards && n > 0) {
      const int64_t total = (n + w - 1) / w * w;
      for (int64_t i = n; i < total; ++i) global.push_back(global[(i - n) % n]);
    }
    for (size_t i = static_cast<size_t>(opts.rank); i < global.size(); i += static_cast<size_t>(w))
      order.push_back(global[i]);
  }

  int64_t pick_question(int64_t index) const {
    if (spec.questions.size() == 1) return 0;
    uint64_t h = mix_seed(mix_seed(opts.seed, static_cast<uint64_t>(epoch)), static_cast<uint64_t>(index));
    return static_cast<int64_t>(h % spec.questions.size());
  }

  // The position of this rank's batch k in the epoch's sequence of batches of all ranks.
  int64_t global_batch(int64_t k) const { return opts.shard_batches ? opts.rank + k * opts.world_size : k; }

  Batch build(int64_t k, std::vector<std::string>& bad) {
    const int64_t b0 = global_batch(k) * opts.batch_size;
    const int64_t b1 = std::min<int64_t>(b0 + opts.batch_size, static_cast<int64_t>(order.size()));
    Batch out;
    out.number = global_batch(k);
    out.epoch = epoch;
    std::vector<torch::Tensor> images;
    std::vector<std::vector<int64_t>> seqs, labs;
    for (int64_t p = b0; p < b1; ++p) {
      const int64_t i = order[p];
      torch::Tensor img;
      try {
        img = preprocess_image(ds->image(i), opts.image);
      } catch (const Error& e) {
        if (!opts.skip_bad) throw;
        // Readers' errors already name the file; other sources (in-memory sets) get it added.
        const std::string src = ds->source(i), what = e.what();
        bad.push_back(what.find(src) != std::string::npos ? what : src + ": " + what);
        continue;
      }
      std::vector<int64_t> ids, lab;
      if (ds->has_text()) {
        auto qa = ds->text(i);
        ids = encode_prompt(qa.first);
        if (opts.with_answer) lab = encode_answer(qa.second);
      } else {
        ids = prompt_ids[pick_question(i)];
        if (opts.with_answer) {
          const int64_t c = ds->label(i);
          if (c < 0 || c >= static_cast<int64_t>(answer_ids.size()))
            throw FormatError(fmt::format("[loader] {}: label {} outside the {} class names", ds->source(i), c,
                                          answer_ids.size()));
          lab = answer_ids[c];
        }
      }
      std::vector<int64_t> labels(ids.size(), -100);
      ids.insert(ids.end(), lab.begin(), lab.end());
      labels.insert(labels.end(), lab.begin(), lab.end());
      images.push_back(img);
      seqs.push_back(std::move(ids));
      labs.push_back(std::move(labels));
      out.indices.push_back(i);
      out.class_ids.push_back(ds->label(i));
    }
    const int64_t bsz = static_cast<int64_t>(seqs.size());
    if (bsz == 0) return out;
    size_t t = 0;
    for (auto& s : seqs) t = std::max(t, s.size());
    const int64_t T = static_cast<int64_t>(t);
    out.input_ids = torch::full({bsz, T}, tok->pad_id(), torch::kInt64);
    out.attention_mask = torch::zeros({bsz, T}, torch::kInt64);
    out.labels = torch::full({bsz, T}, -100, torch::kInt64);
    auto ids_a = out.input_ids.accessor<int64_t, 2>();
    auto mask_a = out.attention_mask.accessor<int64_t, 2>();
    auto lab_a = out.labels.accessor<int64_t, 2>();
    const bool left = opts.padding_side == "left";
    for (int64_t r = 0; r < bsz; ++r) {
      const int64_t len = static_cast<int64_t>(seqs[r].size());
      const int64_t off = left ? T - len : 0;
      for (int64_t j = 0; j < len; ++j) {
        ids_a[r][off + j] = seqs[r][j];
        mask_a[r][off + j] = 1;
        lab_a[r][off + j] = labs[r][j];
      }
    }
    out.images = torch::stack(images);
    return out;
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> l(m);
      stop = true;
    }
    cv_space.notify_all();
    for (auto& th : threads) th.join();
    threads.clear();
    ready.clear();
    stop = false;
  }

  void worker() {
    for (;;) {
      int64_t k;
      {
        std::unique_lock<std::mutex> l(m);
        cv_space.wait(l, [&] { return stop || next_build >= batches || next_build < next_consume + opts.prefetch; });
        if (stop || next_build >= batches) return;
        k = next_build++;
      }
      Slot s;
      try {
        s.batch = build(k, s.bad);
      } catch (...) {
        s.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> l(m);
        ready[k] = std::move(s);
      }
      cv_ready.notify_all();
    }
  }
};

DataLoader::DataLoader(std::shared_ptr<ImageDataset> dataset, std::shared_ptr<Tokenizer> tokenizer,
                       PromptSpec prompts, LoaderOptions opts)
    : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  if (!dataset) throw ConfigError("[loader] dataset is null");
  if (!tokenizer) throw ConfigError("[loader] tokenizer is null");
  if (opts.batch_size <= 0) throw ConfigError(fmt::format("[loader] batch_size must be > 0 (got {})", opts.batch_size));
  if (opts.world_size <= 0 || opts.rank < 0 || opts.rank >= opts.world_size)
    throw ConfigError(fmt::format("[loader] rank {} is not in [0, world_size={})", opts.rank, opts.world_size));
  if (opts.padding_side != "left" && opts.padding_side != "right")
    throw ConfigError(fmt::format("[loader] padding_side must be left or right (got '{}')", opts.padding_side));
  if (opts.workers < 0) throw ConfigError(fmt::format("[loader] workers must be >= 0 (got {})", opts.workers));
  if (opts.prefetch < 1) opts.prefetch = 1;
  conversation_template(opts.conversation);  // validates the name
  if (!dataset->has_text() && prompts.questions.empty())
    throw ConfigError(fmt::format("[loader] dataset '{}': PromptSpec.questions is empty", dataset->name()));
  d.ds = std::move(dataset);
  d.tok = std::move(tokenizer);
  d.spec = std::move(prompts);
  d.opts = std::move(opts);
  d.image_id = d.tok->special_token_id("<image>");
  if (d.image_id < 0) d.image_id = d.tok->add_special_token("<image>");
  if (!d.ds->has_text()) {
    for (auto& q : d.spec.questions) d.prompt_ids.push_back(d.encode_prompt(q));
    if (d.opts.with_answer)
      for (auto& name : d.ds->class_names()) d.answer_ids.push_back(d.encode_answer(fill_label(d.spec.answer_template, name)));
  }
  const int64_t n = d.ds->size(), w = d.opts.world_size, r = d.opts.rank, bs = d.opts.batch_size;
  if (d.opts.shard_batches) {
    const int64_t all = d.opts.drop_last ? n / bs : (n + bs - 1) / bs;  // batches of all ranks together
    d.batches = (all - r + w - 1) / w;                                  // batches r, r+W, ... below all
    d.shard_size = 0;
    for (int64_t g = r; g < all; g += w) d.shard_size += std::min(bs, n - g * bs);
  } else {
    d.shard_size = w > 1 && d.opts.even_shards ? (n + w - 1) / w
                                               : (n - r + w - 1) / w;  // samples r, r+W, ... below n
    d.batches = d.opts.drop_last ? d.shard_size / bs : (d.shard_size + bs - 1) / bs;
  }
  start_epoch(0);
}

DataLoader::~DataLoader() { impl_->stop_workers(); }

int64_t DataLoader::num_batches() const { return impl_->batches; }
int64_t DataLoader::num_samples() const { return impl_->shard_size; }
int64_t DataLoader::skipped_bad() const { return impl_->skipped; }
int64_t DataLoader::image_token_id() const { return impl_->image_id; }
const ImageDataset& DataLoader::dataset() const { return *impl_->ds; }

void DataLoader::start_epoch(int64_t epoch, int64_t skip_batches) {
  Impl& d = *impl_;
  d.stop_workers();
  if (skip_batches < 0 || skip_batches > d.batches)
    throw ConfigError(fmt::format("[loader] skip_batches {} outside [0, {}]", skip_batches, d.batches));
  d.epoch = epoch;
  d.compute_order();
  d.next_build = d.next_consume = skip_batches;
  d.started = false;
}

bool DataLoader::next(Batch& out) {
  Impl& d = *impl_;
  for (;;) {
    if (d.next_consume >= d.batches) return false;
    const int64_t k = d.next_consume;
    if (!d.started) {
      d.started = true;
      for (int i = 0; i < d.opts.workers; ++i) d.threads.emplace_back([&d] { d.worker(); });
    }
    Slot s;
    if (d.threads.empty()) {
      ++d.next_build;
      s.batch = d.build(k, s.bad);
    } else {
      std::unique_lock<std::mutex> l(d.m);
      d.cv_ready.wait(l, [&] { return d.ready.count(k) > 0; });
      s = std::move(d.ready[k]);
      d.ready.erase(k);
    }
    {
      std::lock_guard<std::mutex> l(d.m);
      ++d.next_consume;
    }
    d.cv_space.notify_all();
    if (s.error) std::rethrow_exception(s.error);
    for (auto& why : s.bad)
      log_warn("[loader] {}: skipped bad image ({} so far): {}", d.ds->name(), ++d.skipped, why);
    if (s.batch.size() == 0) continue;  // every image of this batch was skipped as bad
    out = std::move(s.batch);
    return true;
  }
}

}  // namespace emt
