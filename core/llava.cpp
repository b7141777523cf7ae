// The multimodal projector, the LLaVA-style model (image features spliced into the decoder input), its losses,
// and batched KV-cache generation.
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/generate.h>
#include <emt/core/llava.h>
#include <emt/core/tokenizer.h>
#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

namespace emt {

// ---- projector --------------------------------------------------------------------------------------------

ProjectorOptions projector_options(const ModelSection& m) {
  if (m.projector != "linear" && m.projector != "mlp2x_gelu")
    throw ConfigError("[projector] model.projector: unknown type '" + m.projector +
                      "' (expected linear or mlp2x_gelu)");
  return ProjectorOptions{m.projector, m.vision.hidden_size, m.llm.hidden_size, "gelu"};
}

ProjectorImpl::ProjectorImpl(const ProjectorOptions& o) : options(o) {
  TORCH_CHECK(o.type == "linear" || o.type == "mlp2x_gelu", "Projector: unknown type '", o.type, "'");
  linear_1 = register_module("linear_1", Linear(LinearOptions{o.in, o.out, true}));
  if (o.type == "mlp2x_gelu") linear_2 = register_module("linear_2", Linear(LinearOptions{o.out, o.out, true}));
}

torch::Tensor ProjectorImpl::forward(const torch::Tensor& x) {
  // x: [B, N, D_vision] -> [B, N, D_llm]
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) == options.in, "Projector: expected last dim ", options.in, ", got ",
              x.sizes());
  auto h = linear_1(x);
  return linear_2 ? linear_2(activation(options.act, h)) : h;
}

// ---- LLaVA ------------------------------------------------------------------------------------------------

LlavaOptions llava_options(const ModelSection& m, int64_t image_token_id) {
  LlavaOptions o;
  o.vision = clip_vision_options(m.vision);
  o.projector = projector_options(m);
  o.llm = llama_options(m.llm);
  o.select_layer = m.vision.select_layer;
  o.select_feature = m.vision.select_feature;
  o.image_token_id = image_token_id;
  o.conversation = m.conversation;
  int64_t n = m.vision.num_layers;
  if (o.select_layer < -(n + 1) || o.select_layer > n)
    throw ConfigError("[llava] model.vision.select_layer " + std::to_string(o.select_layer) + " out of range for " +
                      std::to_string(n) + " vision layers");
  if (o.select_feature != "patch" && o.select_feature != "cls_patch")
    throw ConfigError("[llava] model.vision.select_feature: unknown '" + o.select_feature +
                      "' (expected patch or cls_patch)");
  return o;
}

LlavaModelImpl::LlavaModelImpl(const LlavaOptions& o) : options(o), image_token_id(o.image_token_id) {
  vision_tower = register_module("vision_tower", ClipVisionModel(o.vision));
  multi_modal_projector = register_module("multi_modal_projector", Projector(o.projector));
  language_model = register_module("language_model", LlamaForCausalLM(o.llm));
}

torch::Tensor LlavaModelImpl::encode_images(const torch::Tensor& images) {
  // images: [B, 3, S, S] -> [B, N, D_llm]
  TORCH_CHECK(images.dim() == 4, "Llava: images must be [B, 3, S, S], got ", images.sizes());
  bool tower_trainable = false;
  for (auto& p : vision_tower->parameters()) tower_trainable = tower_trainable || p.requires_grad();
  auto select = [&] {
    auto h = vision_tower->vision_model->hidden_state(images, options.select_layer);
    return options.select_feature == "patch" ? h.narrow(1, 1, h.size(1) - 1) : h;
  };
  torch::Tensor feats;
  if (tower_trainable) {
    feats = select();
  } else {
    torch::NoGradGuard ng;
    feats = select();
  }
  return multi_modal_projector(feats.to(multi_modal_projector->linear_1->weight.scalar_type()));
}

void LlavaModelImpl::set_prompt_prefix(torch::Tensor prefix) {
  if (prefix.defined())
    TORCH_CHECK(prefix.dim() == 2 && prefix.size(1) == options.llm.hidden_size, "Llava: prompt prefix must be [K, ",
                options.llm.hidden_size, "], got ", prefix.sizes());
  prompt_prefix_ = std::move(prefix);
}

namespace {

// What splicing decides, worked out on the host from host copies of input_ids, attention_mask and labels: where
// each row's image goes, and the spliced mask and labels. Nothing here reads a device tensor, so a caller that
// passes host tensors (the Trainer's objective does) costs no device-to-host sync for it.
struct SplicePlan {
  int64_t n = 0;         // image slots per row (0: no images)
  torch::Tensor starts;  // [B] int64, host: each row's first image slot before the prompt prefix (-1: no images)
  int64_t p0 = -1;       // every row's start when they are all the same (one slice of the whole batch), else -1
  torch::Tensor mask;    // [B, T'] int64, host, prompt prefix included
  torch::Tensor labels;  // [B, T'] int64, host, or undefined
};

torch::Tensor host_long(const torch::Tensor& t) { return t.defined() ? t.to(torch::kCPU).to(torch::kLong) : t; }

SplicePlan plan_splice(const torch::Tensor& ids, const torch::Tensor& mask, const torch::Tensor& labels,
                       int64_t image_token_id, int64_t n, int64_t k) {
  // ids, mask, labels: host [B, T] int64 (labels may be undefined); n: image slots per row (0: no images)
  const int64_t b = ids.size(0), t = ids.size(1);
  auto is_img = ids.eq(image_token_id);
  auto counts = is_img.sum(1);
  SplicePlan p;
  p.n = n;
  p.mask = mask;
  p.labels = labels;
  p.starts = torch::full({b}, -1, torch::kLong);
  if (n > 0) {
    TORCH_CHECK(counts.eq(1).all().item<bool>(), "Llava: every row needs exactly one image token (id ",
                image_token_id, "); counts per row: ", counts);
    p.starts = is_img.to(torch::kLong).argmax(1);
    const int64_t first = p.starts[0].item<int64_t>();
    if (p.starts.eq(first).all().item<bool>()) {
      p.p0 = first;
      p.mask = torch::cat({mask.narrow(1, 0, first), torch::ones({b, n}, torch::kLong),
                           mask.narrow(1, first + 1, t - first - 1)}, 1);
      if (labels.defined())
        p.labels = torch::cat({labels.narrow(1, 0, first), torch::full({b, n}, -100, torch::kLong),
                               labels.narrow(1, first + 1, t - first - 1)}, 1);
    } else {
      std::vector<torch::Tensor> masks, labs;
      const auto st = p.starts.accessor<int64_t, 1>();
      for (int64_t i = 0; i < b; ++i) {
        const int64_t q = st[i];
        masks.push_back(torch::cat(
            {mask[i].narrow(0, 0, q), torch::ones({n}, torch::kLong), mask[i].narrow(0, q + 1, t - q - 1)}));
        if (labels.defined())
          labs.push_back(torch::cat({labels[i].narrow(0, 0, q), torch::full({n}, -100, torch::kLong),
                                     labels[i].narrow(0, q + 1, t - q - 1)}));
      }
      p.mask = torch::stack(masks);
      if (labels.defined()) p.labels = torch::stack(labs);
    }
  } else {
    TORCH_CHECK(counts.eq(0).all().item<bool>(), "Llava: input_ids hold image tokens (id ", image_token_id,
                ") but no images were given");
  }
  if (k > 0) {
    p.mask = torch::cat({torch::ones({b, k}, torch::kLong), p.mask}, 1);
    if (p.labels.defined()) p.labels = torch::cat({torch::full({b, k}, -100, torch::kLong), p.labels}, 1);
  }
  return p;
}

}  // namespace

torch::Tensor LlavaModelImpl::wrap_image_features(const torch::Tensor& image_features) {
  // image_features: [B, N, D] -> [B, N (+2 with <im_start>/<im_end>), D] in the decoder's dtype
  auto emb = language_model->model->embed_tokens->weight;
  auto feats = image_features.to(emb.scalar_type());
  if (!options.wraps_image()) return feats;
  // <im_start> features <im_end>, as the original LLaVA's mm_use_im_start_end. The two rows are read straight from
  // the embedding table (an embedding lookup of them, without an index tensor to copy to the device mid-step).
  const int64_t b = feats.size(0), d = feats.size(2);
  auto row = [&](int64_t id) { return emb.narrow(0, id, 1).to(feats.scalar_type()).unsqueeze(0).expand({b, 1, d}); };
  return torch::cat({row(options.im_start_id), feats, row(options.im_end_id)}, 1);
}

torch::Tensor LlavaModelImpl::splice_embeds(const torch::Tensor& text, const torch::Tensor& feats,
                                            const torch::Tensor& starts, int64_t p0) {
  // text: [B, T, D] (image token rows are placeholders), feats: [B, n, D] wrapped or undefined,
  // starts: [B] host int64 -> [B, T - 1 + n (+ K), D]
  torch::Tensor e = text;
  if (feats.defined()) {
    const int64_t b = text.size(0), t = text.size(1);
    if (p0 >= 0) {
      // Every row's image token at the same position (a right-padded batch of one template): three slices of the
      // whole batch instead of three per row.
      e = torch::cat({text.narrow(1, 0, p0), feats, text.narrow(1, p0 + 1, t - p0 - 1)}, 1);
    } else {
      std::vector<torch::Tensor> rows;
      const auto st = starts.accessor<int64_t, 1>();
      for (int64_t i = 0; i < b; ++i)
        rows.push_back(
            torch::cat({text[i].narrow(0, 0, st[i]), feats[i], text[i].narrow(0, st[i] + 1, t - st[i] - 1)}, 0));
      e = torch::stack(rows);
    }
  }
  if (prompt_prefix_.defined()) {
    auto prefix = prompt_prefix_.to(e.scalar_type()).unsqueeze(0).expand(
        {e.size(0), prompt_prefix_.size(0), prompt_prefix_.size(1)});
    e = torch::cat({prefix, e}, 1);
  }
  return e;
}

SplicedInputs LlavaModelImpl::splice(const torch::Tensor& image_features, const torch::Tensor& input_ids,
                                     const torch::Tensor& attention_mask, const torch::Tensor& labels) {
  // image_features: [B, N, D] or undefined, input_ids: [B, T] -> embeds [B, T - 1 + N (+ K), D]
  TORCH_CHECK(input_ids.dim() == 2, "Llava: input_ids must be [B, T], got ", input_ids.sizes());
  const int64_t b = input_ids.size(0), t = input_ids.size(1);
  const auto dev = input_ids.device();
  if (attention_mask.defined())
    TORCH_CHECK(attention_mask.sizes() == input_ids.sizes(), "Llava: attention_mask ", attention_mask.sizes(),
                " != input_ids ", input_ids.sizes());
  if (labels.defined())
    TORCH_CHECK(labels.sizes() == input_ids.sizes(), "Llava: labels ", labels.sizes(), " != input_ids ",
                input_ids.sizes());
  torch::Tensor feats;
  if (image_features.defined()) {
    TORCH_CHECK(image_features.dim() == 3 && image_features.size(0) == b &&
                    image_features.size(2) == options.llm.hidden_size,
                "Llava: image features must be [", b, ", N, ", options.llm.hidden_size, "], got ",
                image_features.sizes());
    feats = wrap_image_features(image_features);
  }
  // One host copy of the ids (none when they are on the host already): positions are decided there.
  const auto ids_h = host_long(input_ids);
  const auto mask_h = attention_mask.defined() ? host_long(attention_mask) : torch::ones({b, t}, torch::kLong);
  const int64_t k = prompt_prefix_.defined() ? prompt_prefix_.size(0) : 0;
  SplicePlan plan =
      plan_splice(ids_h, mask_h, host_long(labels), image_token_id, feats.defined() ? feats.size(1) : 0, k);
  auto text = language_model->embed(input_ids.masked_fill(input_ids.eq(image_token_id), 0));  // placeholders replaced
  SplicedInputs out;
  out.embeds = splice_embeds(text, feats, plan.starts, plan.p0);
  out.attention_mask = plan.mask.to(dev);
  if (plan.labels.defined()) out.labels = plan.labels.to(dev);
  out.image_starts = (feats.defined() ? plan.starts + k : plan.starts).to(dev);
  return out;
}

LlavaOutput LlavaModelImpl::forward(const torch::Tensor& images, const torch::Tensor& input_ids,
                                    const torch::Tensor& attention_mask, const torch::Tensor& labels) {
  // images: [B, 3, S, S], input_ids: [B, T] -> logits [B, T', V]
  TORCH_CHECK(input_ids.dim() == 2, "Llava: input_ids must be [B, T], got ", input_ids.sizes());
  auto feats = images.defined() ? encode_images(images) : torch::Tensor();
  auto in = splice(feats, input_ids, attention_mask, labels);
  auto hidden = language_model->model->forward(in.embeds, in.attention_mask);
  LlavaOutput out;
  out.logits = language_model->logits(hidden);
  if (labels.defined()) {
    out.labels = in.labels;
    out.loss = causal_lm_loss(out.logits, in.labels);
  }
  return out;
}

torch::Tensor LlavaModelImpl::loss(const torch::Tensor& images, const torch::Tensor& input_ids,
                                   const torch::Tensor& attention_mask, const torch::Tensor& labels) {
  // -> scalar, equal to causal_lm_loss(forward(...).logits, labels)
  TORCH_CHECK(input_ids.dim() == 2 && labels.defined(), "Llava::loss: input_ids [B, T] and labels are required");
  TORCH_CHECK(labels.sizes() == input_ids.sizes(), "Llava: labels ", labels.sizes(), " != input_ids ",
              input_ids.sizes());
  if (attention_mask.defined())
    TORCH_CHECK(attention_mask.sizes() == input_ids.sizes(), "Llava: attention_mask ", attention_mask.sizes(),
                " != input_ids ", input_ids.sizes());
  const int64_t b = input_ids.size(0), t = input_ids.size(1);
  const auto dev = language_model->model->embed_tokens->weight.device();
  // First everything the host decides (from host copies: none are made when the inputs live on the host), then
  // every copy to the device, then the device work, so that the step's only device-to-host sync is the
  // Trainer's own.
  const int64_t k = prompt_prefix_.defined() ? prompt_prefix_.size(0) : 0;
  const auto mask_h = attention_mask.defined() ? host_long(attention_mask) : torch::ones({b, t}, torch::kLong);
  SplicePlan plan = plan_splice(host_long(input_ids), mask_h, host_long(labels), image_token_id,
                                images.defined() ? options.num_image_tokens() : 0, k);
  const int64_t tt = plan.mask.size(1);
  auto lb = plan.labels.narrow(1, 1, tt - 1).reshape({-1});
  auto at = lb.ne(-100).nonzero().squeeze(1);  // scored positions of the shifted sequence
  auto targets = lb.index_select(0, at);
  const bool nb = dev.is_cuda();  // host -> device copies queued, not waited for
  auto ids = input_ids.to(dev, nb), mask = plan.mask.to(dev, nb), at_d = at.to(dev, nb), tgt = targets.to(dev, nb);
  torch::Tensor feats;
  if (images.defined()) {
    feats = wrap_image_features(encode_images(images.to(dev, nb)));
    TORCH_CHECK(feats.size(1) == plan.n, "Llava: ", feats.size(1), " image embeddings per row, expected ", plan.n);
  }
  auto text = language_model->embed(ids.masked_fill(ids.eq(image_token_id), 0));
  auto hidden = language_model->model->forward(splice_embeds(text, feats, plan.starts, plan.p0), mask);  // [B, T', D]
  if (at.numel() == 0) return hidden.sum() * 0.0;  // nothing to score: zero, not NaN
  auto h = hidden.narrow(1, 0, tt - 1).reshape({-1, hidden.size(2)});
  auto logits = language_model->logits(h.index_select(0, at_d)).to(torch::kFloat32);
  return torch::nn::functional::cross_entropy(logits, tgt);
}

torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  // logits: [B, T, V], labels: [B, T] -> scalar
  TORCH_CHECK(logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) &&
                  logits.size(1) == labels.size(1),
              "causal_lm_loss: logits ", logits.sizes(), " and labels ", labels.sizes(), " disagree");
  int64_t t = logits.size(1);
  auto lg = logits.narrow(1, 0, t - 1).reshape({-1, logits.size(2)}).to(torch::kFloat32);
  auto lb = labels.narrow(1, 1, t - 1).reshape({-1}).to(torch::kLong).to(logits.device());
  // The mean over scored positions as sum / count, without reading the count on the host (a device sync): zero,
  // not NaN, when nothing is scored.
  auto total = torch::nn::functional::cross_entropy(
      lg, lb, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
  return total / lb.ne(-100).sum().clamp_min(1).to(total.scalar_type());
}

torch::Tensor answer_logprobs(const torch::Tensor& logits, const torch::Tensor& labels) {
  // logits: [B, T, V], labels: [B, T] -> [B]
  TORCH_CHECK(logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) &&
                  logits.size(1) == labels.size(1),
              "answer_logprobs: logits ", logits.sizes(), " and labels ", labels.sizes(), " disagree");
  int64_t t = logits.size(1);
  auto lp = torch::log_softmax(logits.narrow(1, 0, t - 1).to(torch::kFloat32), -1);
  auto lb = labels.narrow(1, 1, t - 1).to(torch::kLong).to(logits.device());
  auto valid = lb.ne(-100);
  auto picked = lp.gather(2, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1);
  return picked.mul(valid.to(torch::kFloat32)).sum(1);
}

LlavaModel build_llava(const ModelSection& m, int64_t image_token_id) {
  return LlavaModel(llava_options(m, image_token_id));
}

// ---- generation -------------------------------------------------------------------------------------------

namespace {

// logits: [B, V] -> [B] next ids (greedy, or temperature + top-p sampling from `gen`).
torch::Tensor choose_next(const torch::Tensor& logits, const GenerateOptions& o, at::Generator& gen) {
  if (o.temperature <= 0.0) return logits.argmax(-1);
  auto probs = torch::softmax(logits.to(torch::kFloat32).cpu() / o.temperature, -1);
  if (o.top_p < 1.0) {
    auto sorted = probs.sort(-1, /*descending=*/true);
    auto sp = std::get<0>(sorted), idx = std::get<1>(sorted);
    // drop a token once the mass before it already reaches top_p (the first token always stays)
    auto before = sp.cumsum(-1) - sp;
    sp = sp.masked_fill(before.ge(o.top_p), 0.0);
    probs = torch::zeros_like(probs).scatter(-1, idx, sp);
  }
  return torch::multinomial(probs, 1, false, gen).squeeze(-1).to(logits.device());
}

}  // namespace

std::vector<std::vector<int64_t>> generate(LlavaModel& model, const torch::Tensor& images,
                                           const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                                           const GenerateOptions& opts) {
  // images: [B, 3, S, S] or undefined, input_ids: [B, T] (left-padded) -> B lists of new ids
  TORCH_CHECK(input_ids.dim() == 2, "generate: input_ids must be [B, T], got ", input_ids.sizes());
  TORCH_CHECK(opts.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ", opts.max_new_tokens);
  TORCH_CHECK(opts.stop_strings.empty() || opts.tokenizer, "generate: stop strings need a tokenizer");
  torch::NoGradGuard ng;
  auto& lm = model->language_model;
  auto feats = images.defined() ? model->encode_images(images) : torch::Tensor();
  auto in = model->splice(feats, input_ids, attention_mask);
  int64_t b = input_ids.size(0);
  auto embeds = in.embeds;
  auto mask = in.attention_mask;
  auto dev = embeds.device();

  KVCache cache;
  torch::Tensor hidden;
  if (opts.use_cache) {
    cache = make_kv_cache(lm->options, b, embeds.size(1) + opts.max_new_tokens, embeds.scalar_type(), dev);
    hidden = lm->model->forward(embeds, mask, {}, &cache);
  } else {
    hidden = lm->model->forward(embeds, mask);
  }
  auto logits = lm->logits(hidden.select(1, hidden.size(1) - 1));

  at::Generator gen = at::detail::createCPUGenerator(opts.seed);
  std::vector<std::vector<int64_t>> out(b);
  std::vector<bool> done(b, false);
  auto ones = torch::ones({b, 1}, mask.options());
  for (int64_t step = 0; step < opts.max_new_tokens; ++step) {
    auto next = choose_next(logits, opts, gen);
    auto next_cpu = next.cpu();
    bool all_done = true;
    for (int64_t i = 0; i < b; ++i) {
      if (done[i]) continue;
      int64_t id = next_cpu[i].item<int64_t>();
      if (id == opts.eos_id) {
        done[i] = true;
        continue;
      }
      out[i].push_back(id);
      if (!opts.stop_strings.empty()) {
        auto text = opts.tokenizer->decode(out[i]);
        for (auto& s : opts.stop_strings)
          if (!s.empty() && text.find(s) != std::string::npos) done[i] = true;
      }
      all_done = all_done && done[i];
    }
    if (all_done || step + 1 == opts.max_new_tokens) break;
    auto next_emb = lm->embed(next.view({b, 1}).to(dev));
    mask = torch::cat({mask, ones}, 1);
    if (opts.use_cache) {
      hidden = lm->model->forward(next_emb, mask, {}, &cache);
    } else {
      embeds = torch::cat({embeds, next_emb}, 1);
      hidden = lm->model->forward(embeds, mask);
    }
    logits = lm->logits(hidden.select(1, hidden.size(1) - 1));
  }
  return out;
}

torch::Tensor next_token_logits(LlavaModel& model, const torch::Tensor& images, const torch::Tensor& input_ids,
                                const torch::Tensor& attention_mask) {
  // images: [B, 3, S, S], input_ids: [B, T] (left-padded) -> [B, V]
  TORCH_CHECK(input_ids.dim() == 2, "next_token_logits: input_ids must be [B, T], got ", input_ids.sizes());
  torch::NoGradGuard ng;
  auto out = model->forward(images, input_ids, attention_mask);
  return out.logits.select(1, out.logits.size(1) - 1).to(torch::kFloat32);
}

}  // namespace emt
