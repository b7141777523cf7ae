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

SplicedInputs LlavaModelImpl::splice(const torch::Tensor& image_features, const torch::Tensor& input_ids,
                                     const torch::Tensor& attention_mask, const torch::Tensor& labels) {
  // image_features: [B, N, D] or undefined, input_ids: [B, T] -> embeds [B, T - 1 + N (+ K), D]
  TORCH_CHECK(input_ids.dim() == 2, "Llava: input_ids must be [B, T], got ", input_ids.sizes());
  int64_t b = input_ids.size(0), t = input_ids.size(1);
  auto dev = input_ids.device();
  auto lopts = torch::TensorOptions().dtype(torch::kLong).device(dev);
  auto mask = attention_mask.defined() ? attention_mask.to(lopts) : torch::ones({b, t}, lopts);
  TORCH_CHECK(mask.sizes() == input_ids.sizes(), "Llava: attention_mask ", mask.sizes(), " != input_ids ",
              input_ids.sizes());
  if (labels.defined())
    TORCH_CHECK(labels.sizes() == input_ids.sizes(), "Llava: labels ", labels.sizes(), " != input_ids ",
                input_ids.sizes());
  auto is_img = input_ids.eq(image_token_id);
  auto counts = is_img.sum(1);
  auto text = language_model->embed(input_ids.masked_fill(is_img, 0));  // placeholder rows are replaced below

  SplicedInputs out;
  out.image_starts = torch::full({b}, -1, lopts);
  if (image_features.defined()) {
    TORCH_CHECK(image_features.dim() == 3 && image_features.size(0) == b &&
                    image_features.size(2) == text.size(2),
                "Llava: image features must be [", b, ", N, ", text.size(2), "], got ", image_features.sizes());
    TORCH_CHECK(counts.eq(1).all().item<bool>(), "Llava: every row needs exactly one image token (id ",
                image_token_id, "); counts per row: ", counts);
    auto feats = image_features.to(text.scalar_type());
    if (options.wraps_image()) {  // <im_start> features <im_end>, as the original LLaVA's mm_use_im_start_end
      auto ids = torch::tensor({options.im_start_id, options.im_end_id}, lopts).view({1, 2});
      auto se = language_model->embed(ids).to(text.scalar_type()).expand({b, 2, text.size(2)});
      feats = torch::cat({se.narrow(1, 0, 1), feats, se.narrow(1, 1, 1)}, 1);
    }
    int64_t n = feats.size(1);
    auto starts = is_img.to(torch::kLong).argmax(1);
    auto starts_cpu = starts.cpu();
    const int64_t p0 = starts_cpu[0].item<int64_t>();
    if (starts_cpu.eq(p0).all().item<bool>()) {
      // Every row's image token at the same position (a right-padded batch of one template): three slices of the
      // whole batch instead of three per row.
      auto lbl = labels.defined() ? labels.to(lopts) : torch::Tensor();
      out.embeds = torch::cat({text.narrow(1, 0, p0), feats, text.narrow(1, p0 + 1, t - p0 - 1)}, 1);
      out.attention_mask =
          torch::cat({mask.narrow(1, 0, p0), torch::ones({b, n}, lopts), mask.narrow(1, p0 + 1, t - p0 - 1)}, 1);
      if (labels.defined())
        out.labels = torch::cat(
            {lbl.narrow(1, 0, p0), torch::full({b, n}, -100, lopts), lbl.narrow(1, p0 + 1, t - p0 - 1)}, 1);
      out.image_starts = starts;
    } else {
      std::vector<torch::Tensor> rows, masks, labs;
      for (int64_t i = 0; i < b; ++i) {
        int64_t p = starts_cpu[i].item<int64_t>();
        rows.push_back(torch::cat({text[i].narrow(0, 0, p), feats[i], text[i].narrow(0, p + 1, t - p - 1)}, 0));
        masks.push_back(torch::cat({mask[i].narrow(0, 0, p), torch::ones({n}, lopts), mask[i].narrow(0, p + 1, t - p - 1)}));
        if (labels.defined()) {
          auto l = labels[i].to(lopts);
          labs.push_back(torch::cat({l.narrow(0, 0, p), torch::full({n}, -100, lopts), l.narrow(0, p + 1, t - p - 1)}));
        }
      }
      out.embeds = torch::stack(rows);
      out.attention_mask = torch::stack(masks);
      if (labels.defined()) out.labels = torch::stack(labs);
      out.image_starts = starts;
    }
  } else {
    TORCH_CHECK(counts.eq(0).all().item<bool>(), "Llava: input_ids hold image tokens (id ", image_token_id,
                ") but no images were given");
    out.embeds = text;
    out.attention_mask = mask;
    if (labels.defined()) out.labels = labels.to(lopts);
  }
  if (prompt_prefix_.defined()) {
    int64_t k = prompt_prefix_.size(0);
    auto prefix = prompt_prefix_.to(out.embeds.scalar_type()).unsqueeze(0).expand({b, k, prompt_prefix_.size(1)});
    out.embeds = torch::cat({prefix, out.embeds}, 1);
    out.attention_mask = torch::cat({torch::ones({b, k}, lopts), out.attention_mask}, 1);
    if (out.labels.defined()) out.labels = torch::cat({torch::full({b, k}, -100, lopts), out.labels}, 1);
    if (image_features.defined()) out.image_starts = out.image_starts + k;
  }
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
  auto feats = images.defined() ? encode_images(images) : torch::Tensor();
  auto in = splice(feats, input_ids, attention_mask, labels);
  auto hidden = language_model->model->forward(in.embeds, in.attention_mask);  // [B, T', D]
  const int64_t t = hidden.size(1);
  auto h = hidden.narrow(1, 0, t - 1).reshape({-1, hidden.size(2)});
  auto lb = in.labels.narrow(1, 1, t - 1).reshape({-1}).to(torch::kLong).to(hidden.device());
  auto at = lb.ne(-100).nonzero().squeeze(1);
  if (at.numel() == 0) return hidden.sum() * 0.0;  // nothing to score: zero, not NaN
  auto logits = language_model->logits(h.index_select(0, at)).to(torch::kFloat32);
  return torch::nn::functional::cross_entropy(logits, lb.index_select(0, at));
}

torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  // logits: [B, T, V], labels: [B, T] -> scalar
  TORCH_CHECK(logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) &&
                  logits.size(1) == labels.size(1),
              "causal_lm_loss: logits ", logits.sizes(), " and labels ", labels.sizes(), " disagree");
  int64_t t = logits.size(1);
  auto lg = logits.narrow(1, 0, t - 1).reshape({-1, logits.size(2)}).to(torch::kFloat32);
  auto lb = labels.narrow(1, 1, t - 1).reshape({-1}).to(torch::kLong).to(logits.device());
  if (lb.ne(-100).sum().item<int64_t>() == 0) return lg.sum() * 0.0;  // nothing to score: zero, not NaN
  return torch::nn::functional::cross_entropy(
      lg, lb, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
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
