// The LLaVA-style multimodal model: CLIP vision tower -> selected features -> projector -> image embeddings
// spliced into the LLaMA input sequence at the image placeholder. Parameter names are the older llava-hf layout
// (`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`).
#pragma once
#include <emt/core/clip.h>
#include <emt/core/llama.h>
#include <emt/core/projector.h>

#include <string>

namespace emt {

struct ModelSection;

struct LlavaOptions {
  ClipVisionOptions vision;
  ProjectorOptions projector;
  LlamaOptions llm;
  int64_t select_layer = -2;             // index into the vision tower's hidden states
  std::string select_feature = "patch";  // patch (drop CLS) | cls_patch
  int64_t image_token_id = -1;
  std::string conversation = "plain";    // prompt template the weights were trained with (kept in config.json)
  // The original LLaVA's mm_use_im_start_end: the image embeddings are wrapped in the embeddings of these two
  // tokens (<im_start>, <im_end>; -1 = not wrapped).
  int64_t im_start_id = -1, im_end_id = -1;
  bool wraps_image() const { return im_start_id >= 0 && im_end_id >= 0; }
  int64_t num_image_tokens() const {
    return vision.num_patches() + (select_feature == "cls_patch" ? 1 : 0) + (wraps_image() ? 2 : 0);
  }
};
LlavaOptions llava_options(const ModelSection& m, int64_t image_token_id);  // ConfigError on bad shapes

struct LlavaOutput {
  torch::Tensor logits;  // [B, T', V]
  torch::Tensor loss;    // scalar: mean next-token cross entropy over labels != -100; undefined without labels
  torch::Tensor labels;  // [B, T'] after splicing (undefined without labels)
};

// Text and images merged into one embedding sequence (what the decoder sees).
struct SplicedInputs {
  torch::Tensor embeds;          // [B, T', D]
  torch::Tensor attention_mask;  // [B, T'] int64
  torch::Tensor labels;          // [B, T'] or undefined
  torch::Tensor image_starts;    // [B] int64: first image-embedding slot of each row (-1 without images; with
                                 // im_start/im_end wrapping, the <im_start> slot)
};

struct LlavaModelImpl : torch::nn::Module {
  explicit LlavaModelImpl(const LlavaOptions& o);

  // images: [B, 3, S, S] or undefined, input_ids/attention_mask/labels: [B, T] (labels may be undefined).
  // Each row of input_ids holds exactly one image_token_id when images are given (none otherwise); it is
  // replaced by N image embeddings (labels -100, mask 1 there), so T' = T - 1 + N (+ K prompt-prefix tokens).
  LlavaOutput forward(const torch::Tensor& images, const torch::Tensor& input_ids,
                      const torch::Tensor& attention_mask, const torch::Tensor& labels = {});
  // The training loss of forward(...).loss without the full [B, T', V] logits: the LM head runs only where a
  // label is scored (answers are a few tokens of a long prompt), which saves most of its cost and memory.
  torch::Tensor loss(const torch::Tensor& images, const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                     const torch::Tensor& labels);
  // images: [B, 3, S, S] -> [B, N, D_llm]; the tower runs under NoGrad unless one of its parameters is trainable.
  torch::Tensor encode_images(const torch::Tensor& images);
  // image_features: [B, N, D_llm] or undefined -> the decoder's input sequence (prompt prefix included).
  SplicedInputs splice(const torch::Tensor& image_features, const torch::Tensor& input_ids,
                       const torch::Tensor& attention_mask, const torch::Tensor& labels = {});
  // Prompt tuning: K learned embeddings [K, D_llm] (owned by the caller) prepended to every sequence with mask 1
  // and labels -100, as PEFT PROMPT_TUNING does. Undefined removes it.
  void set_prompt_prefix(torch::Tensor prefix);
  // image_features -> the decoder's dtype, wrapped in <im_start>/<im_end> embeddings when the model wraps images.
  torch::Tensor wrap_image_features(const torch::Tensor& image_features);
  // text embeddings [B, T, D] with each row's image token replaced by feats [B, n, D] at `starts` (host [B]; p0 >= 0:
  // every row starts there), the prompt prefix prepended.
  torch::Tensor splice_embeds(const torch::Tensor& text, const torch::Tensor& feats, const torch::Tensor& starts,
                              int64_t p0);
  const torch::Tensor& prompt_prefix() const { return prompt_prefix_; }

  LlavaOptions options;
  int64_t image_token_id = -1;
  ClipVisionModel vision_tower{nullptr};
  Projector multi_modal_projector{nullptr};
  LlamaForCausalLM language_model{nullptr};

 private:
  torch::Tensor prompt_prefix_;
};
TORCH_MODULE(LlavaModel);

// Next-token cross entropy averaged over labels != -100 (labels[t+1] scored by logits[t]); computed in f32.
torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels);
// Per-sample sum of log p(label[t+1] | ...) over labels != -100: logits [B, T, V], labels [B, T] -> [B] f32.
// The evaluator's likelihood ranking uses it on forward() outputs.
torch::Tensor answer_logprobs(const torch::Tensor& logits, const torch::Tensor& labels);

// A randomly initialised model with the shapes of `m` (the tiny base model starts here).
LlavaModel build_llava(const ModelSection& m, int64_t image_token_id);
// Shapes of an HF model directory's config.json (llava, llama or clip) as a ModelSection (pretrained = dir).
// A checkpoint in the original LLaVA layout (no vision/text sub-configs; the CLIP tower named by mm_vision_tower)
// takes the tower's shapes from `vision_tower` (a local CLIP folder), or from mm_vision_tower when that is one.
ModelSection model_section_from_hf(const std::string& dir, const std::string& vision_tower = "");
// Loads a LLaVA directory, converting to `dtype`: the llava-hf layouts (old or new keys) and the original LLaVA
// layout (`model.layers.*`, `model.mm_projector.*`, `lm_head.*`; the CLIP tower from `vision_tower` or
// mm_vision_tower unless the checkpoint holds `model.vision_tower.*`; mm_use_im_start_end wraps the image in the
// <im_start>/<im_end> embeddings). Safetensors only (docs/reproducing-emt.md converts .bin shards). Strict:
// missing, unexpected and mis-shaped tensors are all reported by name in one FormatError.
LlavaModel load_llava(const std::string& hf_dir, torch::ScalarType dtype = torch::kFloat32,
                      torch::Device device = torch::kCPU, const std::string& vision_tower = "");
// Writes config.json (HF LlavaConfig layout) and safetensors (sharded above max_shard_bytes) with keys in
// `key_style` "old" (language_model.model.*) or "new" (model.language_model.*). LoRA children are not part of a
// base checkpoint and are skipped: merge them first to bake them in.
void save_llava(LlavaModel& model, const std::string& dir, const std::string& key_style = "old",
                uint64_t max_shard_bytes = 5ull << 30);

}  // namespace emt
