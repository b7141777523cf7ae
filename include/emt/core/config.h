// Typed run configuration: YAML -> these structs, validated once by load_config(); nothing below the loader
// ever sees a YAML node or a string key. Every struct lists its fields once in visit(), which drives loading,
// dumping, command-line overrides and the config reference (docs/config.md is checked against it by a test).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace emt {

struct RunSection {
  std::string name = "run";          // run directory name under out_dir
  std::string out_dir = "runs";      // parent directory of run directories
  std::string device = "auto";       // auto | cpu | cuda | cuda:N
  int threads = 0;                   // intra-op threads, 0 = all cores
  int64_t seed = 0;                  // seeds every RNG (torch, data order, dropout)
  std::string dtype = "f32";         // weights dtype: f32 | bf16 | f16
  std::string log_level = "info";    // debug | info | warn | error
  bool deterministic = true;         // deterministic algorithms where available

  template <class V> void visit(V& v) {
    v("name", name, "run directory name under run.out_dir");
    v("out_dir", out_dir, "parent directory of run directories");
    v("device", device, "auto | cpu | cuda | cuda:N");
    v("threads", threads, "intra-op threads; 0 = all cores");
    v("seed", seed, "seed for every RNG (weights init, data order, dropout, sampling)");
    v("dtype", dtype, "dtype of frozen weights: f32 | bf16 | f16");
    v("log_level", log_level, "debug | info | warn | error");
    v("deterministic", deterministic, "use deterministic algorithms where LibTorch has them");
  }
};

// CLIP vision tower (HF CLIPVisionConfig semantics) plus LLaVA's feature selection.
struct VisionConfig {
  int image_size = 28;
  int patch_size = 7;
  int num_channels = 3;
  int hidden_size = 96;
  int num_layers = 3;
  int num_heads = 4;
  int intermediate_size = 384;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  double layer_norm_eps = 1e-5;
  int select_layer = -2;                  // hidden state used as image features (LLaVA: -2)
  std::string select_feature = "patch";   // patch (drop CLS) | cls_patch

  template <class V> void visit(V& v) {
    v("image_size", image_size, "input resolution (square)");
    v("patch_size", patch_size, "patch edge in pixels");
    v("num_channels", num_channels, "input channels");
    v("hidden_size", hidden_size, "encoder width");
    v("num_layers", num_layers, "encoder layers");
    v("num_heads", num_heads, "attention heads");
    v("intermediate_size", intermediate_size, "MLP width");
    v("hidden_act", hidden_act, "quick_gelu | gelu");
    v("layer_norm_eps", layer_norm_eps, "LayerNorm epsilon");
    v("select_layer", select_layer, "hidden state index used as image features (negative counts from the end)");
    v("select_feature", select_feature, "patch (drop CLS) | cls_patch (keep CLS)");
  }
};

// CLIP text tower (HF CLIPTextConfig semantics), used for the zero-shot baseline and the CLIP scorer.
struct ClipTextConfig {
  int vocab_size = 512;
  int hidden_size = 96;
  int num_layers = 2;
  int num_heads = 4;
  int intermediate_size = 384;
  int max_position_embeddings = 32;
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;
  int projection_dim = 64;  // shared image-text embedding width

  template <class V> void visit(V& v) {
    v("vocab_size", vocab_size, "text vocabulary size");
    v("hidden_size", hidden_size, "text encoder width");
    v("num_layers", num_layers, "text encoder layers");
    v("num_heads", num_heads, "attention heads");
    v("intermediate_size", intermediate_size, "MLP width");
    v("max_position_embeddings", max_position_embeddings, "longest text in tokens");
    v("hidden_act", hidden_act, "quick_gelu | gelu");
    v("layer_norm_eps", layer_norm_eps, "LayerNorm epsilon");
    v("projection_dim", projection_dim, "width of the joint image-text embedding");
  }
};

// LLaMA-style decoder (HF LlamaConfig semantics).
struct LlmConfig {
  int vocab_size = 512;
  int hidden_size = 128;
  int num_layers = 4;
  int num_heads = 4;
  int num_kv_heads = 4;
  int intermediate_size = 344;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  int max_position_embeddings = 256;
  bool tie_word_embeddings = false;

  template <class V> void visit(V& v) {
    v("vocab_size", vocab_size, "vocabulary size (rows of embed_tokens and lm_head)");
    v("hidden_size", hidden_size, "decoder width");
    v("num_layers", num_layers, "decoder layers");
    v("num_heads", num_heads, "query heads");
    v("num_kv_heads", num_kv_heads, "key/value heads (grouped-query attention); divides num_heads");
    v("intermediate_size", intermediate_size, "SwiGLU width");
    v("rope_theta", rope_theta, "RoPE base");
    v("rms_norm_eps", rms_norm_eps, "RMSNorm epsilon");
    v("max_position_embeddings", max_position_embeddings, "longest sequence (KV cache capacity)");
    v("tie_word_embeddings", tie_word_embeddings, "lm_head shares embed_tokens' weight");
  }
};

struct ModelSection {
  std::string pretrained;               // HF model directory; empty = the built-in tiny base model
  std::string projector = "linear";     // linear | mlp2x_gelu
  std::string conversation = "plain";   // plain | vicuna_v1 | llava_v0
  std::string system_prompt;            // empty = the template's default
  std::string tokenizer;                // tokenizer.model path; empty = from `pretrained` or the tiny recipe
  std::string vision_tower;             // CLIP folder for checkpoints without the tower (original LLaVA layout)
  VisionConfig vision;
  ClipTextConfig clip_text;
  LlmConfig llm;

  template <class V> void visit(V& v) {
    v("pretrained", pretrained, "HF-layout model directory; empty = built-in tiny base model (emt pretrain)");
    v("projector", projector, "linear | mlp2x_gelu");
    v("conversation", conversation, "prompt template: plain | vicuna_v1 | llava_v0");
    v("system_prompt", system_prompt, "system text; empty = the template's default");
    v("tokenizer", tokenizer, "SentencePiece tokenizer.model; empty = from model.pretrained or the tiny recipe");
    v("vision_tower", vision_tower, "CLIP model directory for an original-layout LLaVA checkpoint, which holds no tower (config.json names it in mm_vision_tower); empty = mm_vision_tower when that is a local directory");
    v("vision", vision, "CLIP vision tower shape");
    v("clip_text", clip_text, "CLIP text tower shape");
    v("llm", llm, "language model shape");
  }
};

struct DatasetConfig {
  std::string format = "idx";  // idx | cifar10 | cifar100 | imagefolder | manifest | llava_json | synthetic
  std::string path;            // directory or file; relative paths resolve against data.root
  std::vector<std::string> class_names;  // override the format's own class names
  std::string class_map;       // ImageFolder: file mapping folder name -> class name
  std::string prompt;          // question; empty = the paper's prompt for this dataset
  std::string answer = "The object is a(n) {label}.";  // fine-tuning answer template
  std::vector<std::string> aliases;  // extra "alias=label" pairs for the strict scorer
  int64_t train_max_samples = 0;     // 0 = all
  int64_t test_max_samples = 0;      // 0 = all
  double test_fraction = 1.0;        // the paper scores 20% of each test set
  bool balanced = false;             // subsets take the same count per class
  bool skip_bad = false;             // skip (and count) undecodable images instead of failing

  template <class V> void visit(V& v) {
    v("format", format, "idx | cifar10 | cifar100 | imagefolder | manifest | llava_json | synthetic");
    v("path", path, "directory or file; relative to data.root");
    v("class_names", class_names, "override the class names the format provides");
    v("class_map", class_map, "ImageFolder: text file 'folder name' per line, e.g. miniImageNet wnid -> name");
    v("prompt", prompt, "question; empty = the paper's prompt for this dataset");
    v("answer", answer, "fine-tuning answer template; {label} is replaced");
    v("aliases", aliases, "extra 'alias=label' pairs the strict scorer accepts");
    v("train_max_samples", train_max_samples, "deterministic train subset size; 0 = all");
    v("test_max_samples", test_max_samples, "deterministic test subset size; 0 = all");
    v("test_fraction", test_fraction, "fraction of the test split that is scored (paper: 0.2)");
    v("balanced", balanced, "subsets take the same number per class");
    v("skip_bad", skip_bad, "skip and count undecodable images instead of failing");
  }
};

struct DataSection {
  std::string root = "data";
  int workers = 2;   // background decode/preprocess threads
  int prefetch = 4;  // batches prepared ahead
  std::map<std::string, DatasetConfig> datasets;

  template <class V> void visit(V& v) {
    v("root", root, "base directory for relative dataset paths");
    v("workers", workers, "background decode/preprocess threads");
    v("prefetch", prefetch, "batches prepared ahead of the trainer");
    v("datasets", datasets, "named datasets: name -> dataset settings");
  }
};

struct LoraConfig {
  int r = 64;
  double alpha = 16.0;
  double dropout = 0.05;
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  std::string target_regex;             // if set, replaces target_modules
  std::vector<std::string> exclude;     // module-name substrings never adapted
  bool use_rslora = false;              // scale alpha/sqrt(r) instead of alpha/r
  std::string init = "kaiming";         // kaiming (PEFT default) | gaussian
  std::map<std::string, int64_t> rank_pattern;    // module-name pattern -> r
  std::map<std::string, double> alpha_pattern;    // module-name pattern -> alpha

  template <class V> void visit(V& v) {
    v("r", r, "LoRA rank");
    v("alpha", alpha, "LoRA alpha (scale = alpha / r)");
    v("dropout", dropout, "dropout on the LoRA input");
    v("target_modules", target_modules, "module names to adapt, or [all-linear]");
    v("target_regex", target_regex, "regex on module paths; replaces target_modules when set");
    v("exclude", exclude, "module names never adapted");
    v("use_rslora", use_rslora, "rank-stabilized scale alpha / sqrt(r)");
    v("init", init, "kaiming (A Kaiming-uniform, B zeros) | gaussian");
    v("rank_pattern", rank_pattern, "per-module rank: name pattern -> r");
    v("alpha_pattern", alpha_pattern, "per-module alpha: name pattern -> alpha");
  }
};

struct PromptTuningConfig {
  int num_virtual_tokens = 8;
  std::string init = "random";  // random | text
  std::string init_text;

  template <class V> void visit(V& v) {
    v("num_virtual_tokens", num_virtual_tokens, "learned embeddings placed before the text");
    v("init", init, "random | text");
    v("init_text", init_text, "text whose token embeddings initialise the prompt (init: text)");
  }
};

// Forgetting mitigations (docs/mitigation.md): what the study methods l2sp, ewc, lwf, ema, replay and wise-ft add to
// the method they run on (lora, or the one after ':' as in ewc:linear).
struct MitigationConfig {
  std::string reference = "generic";  // replay / EWC data: generic (the tiny base's own instruction set) | datasets
  double replay_ratio = 0.25;         // replay: share of each combined batch drawn from the reference data
  double l2sp_weight = 0.01;          // l2sp: w * sum (theta - theta_0)^2 over the trained tensors
  double ewc_weight = 0.01;           // ewc: w * sum F (theta - theta_0)^2, F the diagonal Fisher scaled to mean 1
  int64_t ewc_fisher_batches = 8;     // ewc: reference batches the Fisher is estimated on
  double lwf_weight = 1.0;            // lwf: w * T^2 * KL(base || model) on the answer tokens
  double lwf_temperature = 2.0;       // lwf: softmax temperature T
  double ema_decay = 0.99;            // ema: average <- d * average + (1 - d) * theta after every optimizer step
  std::vector<double> wise_ft_alphas = {0.25, 0.5, 0.75, 1.0};  // wise-ft: base + a * (tuned - base), scored

  template <class V> void visit(V& v) {
    v("reference", reference, "replay and EWC data: generic (the tiny base's generic instructions) | datasets (the other study datasets, fine-tuning prompt)");
    v("replay_ratio", replay_ratio, "replay: share of each combined batch drawn from the reference data, in (0, 1)");
    v("l2sp_weight", l2sp_weight, "l2sp: weight of sum (theta - theta_0)^2 over the trained tensors");
    v("ewc_weight", ewc_weight, "ewc: weight of sum F (theta - theta_0)^2, F the diagonal Fisher scaled to mean 1");
    v("ewc_fisher_batches", ewc_fisher_batches, "ewc: reference batches the diagonal Fisher is estimated on");
    v("lwf_weight", lwf_weight, "lwf: weight of T^2 KL(base || model) on the answer tokens");
    v("lwf_temperature", lwf_temperature, "lwf: softmax temperature T");
    v("ema_decay", ema_decay, "ema: decay d of the moving average of the trained tensors, in (0, 1)");
    v("wise_ft_alphas", wise_ft_alphas, "wise-ft: interpolation weights a in [0, 1] scored after every epoch (base + a (tuned - base))");
  }
};

// A study method's two parts: "ewc" -> {lora, ewc}; "ewc:linear" -> {linear, ewc}; "lora" -> {lora, ""}.
struct MethodParts {
  std::string base;        // the method whose components are trained
  std::string mitigation;  // "" | l2sp | ewc | lwf | ema | replay | wise-ft
};
MethodParts split_method(const std::string& method);
const std::vector<std::string>& mitigation_names();

struct FinetuneSection {
  std::string dataset;              // the ONE dataset fine-tuned on (emt train); the study sets it per cell
  std::string method = "lora";      // linear | lora | lora-only | prompt | linear+prompt | full | lora-attn | lora-mlp | l2sp | ewc | lwf | ema | replay | wise-ft
  std::string question = "What is the object in the image?";  // the paper's fine-tuning question
  int epochs = 3;
  int64_t max_steps = 0;            // > 0 stops after this many optimizer steps
  int batch_size = 16;              // per optimizer micro-step
  int grad_accum = 1;
  double learning_rate = 2e-4;
  double projector_lr = 0.0;        // 0 = same as learning_rate (LLaVA's mm_projector_lr)
  double weight_decay = 0.0;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  std::string schedule = "cosine";  // constant | linear | cosine
  double warmup_ratio = 0.03;
  int64_t warmup_steps = 0;         // > 0 overrides warmup_ratio
  double max_grad_norm = 1.0;       // 0 = no clipping
  std::string precision = "f32";    // f32 | bf16 (autocast) | fp16 (autocast + loss scaling, CUDA)
  bool grad_checkpointing = false;
  int nan_patience = 5;             // stop after this many non-finite steps in a row
  int keep_last_n = 0;              // 0 = keep every epoch checkpoint
  int64_t checkpoint_every_steps = 0;
  int64_t log_every_steps = 10;
  LoraConfig lora;
  PromptTuningConfig prompt_tuning;
  MitigationConfig mitigation;

  template <class V> void visit(V& v) {
    v("dataset", dataset, "name of the ONE dataset to fine-tune on (a key of data.datasets)");
    v("method", method, "linear | lora | lora-only | prompt | linear+prompt | full | lora-attn | lora-mlp, or a mitigation l2sp | ewc | lwf | ema | replay | wise-ft (on lora; MITIGATION:METHOD for another)");
    v("question", question, "fine-tuning question (the paper: 'What is the object in the image?')");
    v("epochs", epochs, "epochs to train");
    v("max_steps", max_steps, "stop after this many optimizer steps; 0 = no limit");
    v("batch_size", batch_size, "samples per micro-step");
    v("grad_accum", grad_accum, "micro-steps per optimizer step");
    v("learning_rate", learning_rate, "peak learning rate");
    v("projector_lr", projector_lr, "projector learning rate; 0 = learning_rate");
    v("weight_decay", weight_decay, "AdamW decoupled weight decay (never on norms and biases)");
    v("adam_beta1", adam_beta1, "AdamW beta1");
    v("adam_beta2", adam_beta2, "AdamW beta2");
    v("adam_eps", adam_eps, "AdamW epsilon");
    v("schedule", schedule, "constant | linear | cosine");
    v("warmup_ratio", warmup_ratio, "warmup as a fraction of total steps");
    v("warmup_steps", warmup_steps, "warmup steps; > 0 overrides warmup_ratio");
    v("max_grad_norm", max_grad_norm, "global-norm clipping; 0 = off");
    v("precision", precision, "f32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling; CUDA only)");
    v("grad_checkpointing", grad_checkpointing, "recompute decoder blocks in backward to save memory");
    v("nan_patience", nan_patience, "stop after this many non-finite losses in a row");
    v("keep_last_n", keep_last_n, "epoch checkpoints kept; 0 = all");
    v("checkpoint_every_steps", checkpoint_every_steps, "extra checkpoint every K steps; 0 = epochs only");
    v("log_every_steps", log_every_steps, "metrics.jsonl line every K steps");
    v("lora", lora, "LoRA settings");
    v("prompt_tuning", prompt_tuning, "prompt-tuning settings");
    v("mitigation", mitigation, "forgetting-mitigation settings (methods l2sp, ewc, lwf, ema, replay, wise-ft)");
  }
};

struct EvalSection {
  std::vector<std::string> datasets;     // empty = every dataset in data.datasets
  int batch_size = 64;
  int max_new_tokens = 12;
  int64_t max_samples = 0;               // per dataset, 0 = all of the (fractioned) test split
  std::string primary_scorer = "strict"; // strict | clip | likelihood | judge
  std::vector<std::string> scorers = {"strict", "likelihood"};
  std::string judge_command;             // external judge: reads JSON on stdin, prints yes/no
  std::string judge_url;                 // or an OpenAI-compatible endpoint's base URL
  std::string judge_model;
  std::string judge_api_key_env = "OPENAI_API_KEY";
  double judge_timeout_s = 30;
  int64_t judge_retries = 3;
  std::string judge_cache;               // "" = <run dir>/judge_cache.jsonl
  bool clip_baseline = true;             // CLIP zero-shot accuracy of the vision encoder
  std::string clip_model;                // HF CLIP dir; empty = <base model dir>/clip when present
  std::vector<std::string> clip_templates = {"a photo of a {label}."};
  double temperature = 0.0;              // 0 = greedy
  double top_p = 1.0;

  template <class V> void visit(V& v) {
    v("datasets", datasets, "datasets scored; empty = all of data.datasets");
    v("batch_size", batch_size, "generation batch size");
    v("max_new_tokens", max_new_tokens, "longest answer generated");
    v("max_samples", max_samples, "test images per dataset; 0 = all");
    v("primary_scorer", primary_scorer, "strict | clip | likelihood | judge");
    v("scorers", scorers, "scorers computed besides the primary one");
    v("judge_command", judge_command, "external judge command (JSON on stdin, yes/no on stdout); runs only when the command line says `--allow-judge` (docs/scoring.md)");
    v("judge_url", judge_url, "OpenAI-compatible API base URL of the judge (POST <url>/chat/completions), instead of a command; contacted only with `--allow-judge`");
    v("judge_model", judge_model, "the judge endpoint's model name (required with judge_url)");
    v("judge_api_key_env", judge_api_key_env, "environment variable holding the judge endpoint's API key (never written anywhere); unset = no key sent");
    v("judge_timeout_s", judge_timeout_s, "judge request timeout in seconds, connection included");
    v("judge_retries", judge_retries, "further tries after a judge timeout, connection error, HTTP 408, 429 or 5xx (backoff 1, 2, 4 ... s)");
    v("judge_cache", judge_cache, "JSON-lines cache of judge answers keyed by (judge, label, prediction); empty = <run dir>/judge_cache.jsonl");
    v("clip_baseline", clip_baseline, "score the vision encoder's CLIP zero-shot accuracy");
    v("clip_model", clip_model, "HF CLIP directory for the baseline and the clip scorer; empty = <base>/clip");
    v("clip_templates", clip_templates, "zero-shot prompt ensemble; {label} is replaced");
    v("temperature", temperature, "sampling temperature; 0 = greedy");
    v("top_p", top_p, "nucleus sampling mass");
  }
};

struct StudySection {
  std::vector<std::string> finetune_datasets;  // each fine-tuned separately
  std::vector<std::string> methods = {"linear", "lora"};
  std::vector<int64_t> seeds = {0};
  int epochs = 3;
  std::map<std::string, double> learning_rate_by_method = {{"linear", 2e-3}, {"lora", 2e-4}};
  bool eval_base = true;

  template <class V> void visit(V& v) {
    v("finetune_datasets", finetune_datasets, "datasets fine-tuned on, one study cell each");
    v("methods", methods, "training methods compared");
    v("seeds", seeds, "seeds per cell");
    v("epochs", epochs, "epochs per cell; every dataset is re-scored after each");
    v("learning_rate_by_method", learning_rate_by_method, "learning rate per method (falls back to finetune.learning_rate)");
    v("eval_base", eval_base, "score the base model as epoch 0");
  }
};

// Recipe for the built-in tiny base model (emt pretrain): three stages with the one trainer.
struct PretrainSection {
  std::string cache_dir = "models/tiny-base";  // reused when its recorded config matches
  std::vector<std::string> datasets;           // empty = every dataset in data.datasets
  int64_t clip_steps = 1300;
  int64_t align_steps = 50;
  int64_t instruct_steps = 800;
  int batch_size = 32;
  int clip_batch_size = 128;
  double learning_rate = 2e-3;
  int64_t tokenizer_vocab = 512;
  int64_t train_max_samples = 6000;  // per dataset
  int64_t instruct_max_samples = 0;  // per dataset, drawn from those; 0 = all of them
  std::string contrast = "own_dataset";  // or "disjoint_labels": which captions an image competes with in stage a
  int64_t pick_own_labels = 0;  // an experiment: same-dataset distractors in every "pick" list
  bool letters = true;          // rendered letters in the pool (generic data, never a study's)
  int64_t pick_unlisted = 0;    // an experiment: percent of "pick" lists without the true name

  template <class V> void visit(V& v) {
    v("cache_dir", cache_dir, "where the tiny base model is written and reused");
    v("datasets", datasets, "datasets mixed into pretraining; empty = all");
    v("clip_steps", clip_steps, "stage a: contrastive CLIP steps");
    v("align_steps", align_steps, "stage b: projector alignment steps");
    v("instruct_steps", instruct_steps, "stage c: instruction-tuning steps");
    v("batch_size", batch_size, "batch size of the language stages (b, c)");
    v("clip_batch_size", clip_batch_size, "batch size of the contrastive stage (a): images are cheap there");
    v("learning_rate", learning_rate, "peak learning rate for every stage");
    v("tokenizer_vocab", tokenizer_vocab, "SentencePiece vocabulary trained for the tiny model");
    v("train_max_samples", train_max_samples, "training images per dataset");
    v("instruct_max_samples", instruct_max_samples,
      "images per dataset that the language stages (b, c) show the LLM, drawn from those; 0 = all of them");
    v("contrast", contrast,
      "stage a: an image competes with the captions of its own dataset only (own_dataset), or also with those of "
      "every dataset whose labels share no word with its own (disjoint_labels)");
    v("pick_own_labels", pick_own_labels,
      "an experiment, 0 by default: each 'pick' list of stage c also offers this many other labels of the image's "
      "own dataset, so the LLM practises choosing among labels of one dataset (part of a study's list; "
      "docs/findings.md)");
    v("letters", letters,
      "add rendered capital letters (the synthetic 'letters' set, as many images as train_max_samples, or 5000 "
      "when that is 0) to the pool of every stage as generic data: their 'pick' lists offer other letters, so the "
      "LLM practises choosing among options of one kind by looking at the image without practising any study's "
      "labels");
    v("pick_unlisted", pick_unlisted,
      "an experiment, 0 by default: the percent of stage c's 'pick' lists that leave the image's own name out, "
      "answered with that name all the same, so that a list only suggests words (0-100; docs/findings.md)");
  }
};

struct RunConfig {
  RunSection run;
  ModelSection model;
  DataSection data;
  FinetuneSection finetune;
  EvalSection eval;
  StudySection study;
  PretrainSection pretrain;

  template <class V> void visit(V& v) {
    v("run", run, "where and how a run executes");
    v("model", model, "base model: pretrained directory or tiny shapes");
    v("data", data, "datasets");
    v("finetune", finetune, "fine-tuning");
    v("eval", eval, "evaluation");
    v("study", study, "forgetting study grid");
    v("pretrain", pretrain, "built-in tiny base-model recipe");
  }
};

// Loads `path` (following `extends:` chains, relative to each file), applies `overrides` ("dotted.key=value",
// the value parsed as YAML, so lists work: `eval.datasets=[mnist,fmnist]`), validates every rule and throws one
// ConfigError listing ALL problems as `file:line:col: dotted.key: message (got VALUE)`.
RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Same, starting from defaults and a YAML string (used by tests and library users); `name` labels errors.
RunConfig load_config_string(const std::string& yaml, const std::vector<std::string>& overrides = {},
                             const std::string& name = "<string>");
// Re-checks the cross-field rules of an already-built config (library users who edit structs in code).
void validate_config(const RunConfig& cfg);
// The resolved config as YAML (what `emt config show` prints and every run directory records).
std::string config_to_yaml(const RunConfig& cfg);
// Every dotted key with its doc string, in declaration order (map entries shown as `<name>`).
std::vector<std::pair<std::string, std::string>> config_reference();
// Closest candidate by edit distance, or "" when none is close enough.
std::string did_you_mean(const std::string& key, const std::vector<std::string>& candidates);

// ---- names registered by library users ----------------------------------------------------------------------
// register_dataset_format (emt/core/dataset.h), register_scorer (emt/eval/evaluator.h) and register_method
// (emt/train/finetune.h) add their names here; validation then accepts them in data.datasets.<name>.format,
// eval.scorers / eval.primary_scorer and study.methods / finetune.method / study.learning_rate_by_method like the
// built-in ones. Register before loading configs and starting runs (registration is guarded by a mutex, but a
// run reads the registries as they are when it starts).
enum class ExtensionKind { dataset_format, scorer, method };
// ConfigError when `name` is empty or a built-in name of that kind. Registering a name again replaces it.
// For methods, `base` is the built-in method whose components it trains ("lora", "linear", ...).
void add_extension_name(ExtensionKind kind, const std::string& name, const std::string& base = "");
std::vector<std::string> extension_names(ExtensionKind kind);
// The built-in method a registered method trains like, or "" when `method` is not a registered one.
std::string registered_method_base(const std::string& method);

}  // namespace emt
