// LoRA on any module tree: choose emt::Linear layers by name / regex / all-linear, attach low-rank deltas with
// PEFT's initialisation and scaling rules, freeze the base, merge / unmerge / interpolate all of them at once.
#pragma once
#include <emt/core/config.h>
#include <emt/core/layers.h>
#include <torch/nn/module.h>

#include <string>
#include <utility>
#include <vector>

namespace emt {

// Every emt::Linear below `root`, in named_modules() order, with its path ("language_model.model.layers.0...").
std::vector<std::pair<std::string, LinearImpl*>> linear_layers(torch::nn::Module& root);
// Only those that currently carry a low-rank delta.
std::vector<std::pair<std::string, LinearImpl*>> lora_layers(torch::nn::Module& root);

// Paths of the layers `cfg` selects, in named_modules() order. Rules (PEFT semantics):
//   target_regex set      -> the regex must match the whole path (Python re.fullmatch);
//   target_modules = [all-linear] -> every Linear whose path starts with one of `scope` except `lm_head`;
//   otherwise             -> path == name or path ends with "." + name;
//   exclude               -> path == name or path ends with "." + name (removes a selected layer).
// Only paths under one of `scope` (prefixes such as "language_model.") are considered; an empty scope means the
// whole tree. ConfigError for an invalid regex, for r <= 0, or when nothing matches.
std::vector<std::string> select_lora_targets(torch::nn::Module& root, const LoraConfig& cfg,
                                             const std::vector<std::string>& scope = {"language_model."});

// PEFT's rank_pattern / alpha_pattern lookup: the first pattern P (in the map's order) for which the whole
// `path` matches the regex "(.*\.)?(P)$" wins; otherwise cfg.r / cfg.alpha.
int64_t lora_rank_for(const LoraConfig& cfg, const std::string& path);
double lora_alpha_for(const LoraConfig& cfg, const std::string& path);
// alpha / r, or alpha / sqrt(r) with rsLoRA.
double lora_scale(int64_t r, double alpha, bool use_rslora);

// Attaches a delta to every selected layer (rank/alpha per module, dropout cfg.dropout, init cfg.init:
// "kaiming" = A Kaiming-uniform(a=sqrt(5)), B = 0; "gaussian" = A ~ N(0, std 1/r), B = 0). Draws from the
// global torch generator, so seed it first for reproducible A. With `freeze_base`, every parameter of `root`
// that is not a LoRA parameter gets requires_grad = false (PEFT's mark_only_lora_as_trainable).
// Returns the adapted paths.
std::vector<std::string> inject_lora(torch::nn::Module& root, const LoraConfig& cfg,
                                     const std::vector<std::string>& scope = {"language_model."},
                                     bool freeze_base = true);

// W += runtime_scale * scale * B A on every adapted layer (and back). Merged layers keep their deltas so
// unmerge restores the base weights up to rounding.
void merge_lora(torch::nn::Module& root);
void unmerge_lora(torch::nn::Module& root);
// Interpolates between the base (0) and the adapted model (1), also on merged layers (re-merged at the new scale).
void set_lora_runtime_scale(torch::nn::Module& root, double s);
// Removes every delta (unmerging first), leaving the base model.
void remove_lora(torch::nn::Module& root);

// True for parameter names created by LoRA (a path component starting with "lora_").
bool is_lora_parameter(const std::string& name);

}  // namespace emt
