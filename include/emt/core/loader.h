// Batches for training and generation: images decoded and preprocessed on background threads, prompts rendered
// with a conversation template and tokenized, labels masked, sequences padded. Order is a pure function of
// (seed, epoch, rank, world_size), so runs resume exactly and multi-threaded output equals single-threaded.
#pragma once
#include <emt/core/dataset.h>
#include <emt/core/image.h>
#include <emt/core/tokenizer.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace emt {

struct Batch {
  torch::Tensor images;          // [B, 3, S, S] float32, preprocessed
  torch::Tensor input_ids;       // [B, T] int64: bos + prompt (one image token) [+ answer + eos], padded
  torch::Tensor attention_mask;  // [B, T] int64: 1 on tokens, 0 on padding
  torch::Tensor labels;          // [B, T] int64: answer ids and eos; -100 on prompt and padding
  std::vector<int64_t> class_ids;  // dataset label of each row (-1 for instruction data)
  std::vector<int64_t> indices;    // dataset index of each row
  int64_t number = 0;              // position in the epoch's sequence of batches (of all ranks, with shard_batches)
  int64_t epoch = 0;               // the loader epoch it belongs to (0-based)
  int64_t size() const { return static_cast<int64_t>(indices.size()); }
};

struct PromptSpec {
  // One is chosen per sample, deterministically from (seed, epoch, index); usually exactly one.
  std::vector<std::string> questions;
  std::string answer_template = "The object is a(n) {label}.";  // {label} = the class name
};

struct LoaderOptions {
  int64_t batch_size = 16;
  bool shuffle = true;
  bool with_answer = true;  // false = prompt only (generation)
  bool drop_last = false;
  uint64_t seed = 0;
  // Data parallel: the epoch's order is cut into world_size interleaved shards; rank r takes samples
  // r, r + W, r + 2W, ... of it. With even_shards the order is first extended by wrapping around to a multiple
  // of W (as torch's DistributedSampler does), so every rank has the same number of batches; without, each
  // sample appears exactly once over all ranks and shard sizes differ by at most one.
  int64_t rank = 0, world_size = 1;
  bool even_shards = true;
  // Evaluation: deal out whole batches instead (rank r builds batches r, r + W, ... of the one-process sequence),
  // so every batch is exactly the batch one process would build and results gather to the one-process ones.
  bool shard_batches = false;
  int workers = 2;   // background threads; 0 = build batches in next()
  int prefetch = 4;  // batches built ahead of the consumer
  std::string padding_side = "right";  // "left" for generation
  std::string conversation = "plain";  // template name (see conversation.h)
  std::string system;                  // empty = the template's default
  ImageProcessorOptions image;
  bool skip_bad = false;  // undecodable images are dropped from their batch, counted and logged as warnings
};

class DataLoader {
 public:
  DataLoader(std::shared_ptr<ImageDataset> dataset, std::shared_ptr<Tokenizer> tokenizer, PromptSpec prompts,
             LoaderOptions opts);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  int64_t num_batches() const;  // per epoch on this rank
  int64_t num_samples() const;  // per epoch on this rank (before skip_bad)
  // Starts (or restarts) an epoch; skip_batches resumes a partly consumed epoch at that batch.
  void start_epoch(int64_t epoch, int64_t skip_batches = 0);
  bool next(Batch& out);  // false at the end of the epoch; rethrows a worker's error at its batch
  int64_t skipped_bad() const;  // images skipped (skip_bad) in the batches next() has returned so far
  int64_t image_token_id() const;
  const ImageDataset& dataset() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace emt
