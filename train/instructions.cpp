// Generic visual instructions generated from labelled images (the tiny base model's stage b and c data) and the
// check that none of them is a study's prompt or answer.
#include <emt/core/error.h>
#include <emt/train/instructions.h>
#include "core/text.h"
#include <fmt/format.h>

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <map>

namespace emt {

namespace {

const std::vector<std::string>& colour_words() {
  static const std::vector<std::string> w = {"white", "grey", "black", "red", "orange", "yellow", "green", "blue",
                                             "purple"};
  return w;
}
const std::vector<std::string>& position_words() {
  static const std::vector<std::string> w = {"top left", "top right", "bottom left", "bottom right"};
  return w;
}
const std::vector<std::string>& count_words() {
  static const std::vector<std::string> w = {"one", "two", "three", "four"};
  return w;
}
const std::vector<std::string>& size_words() {
  static const std::vector<std::string> w = {"large", "small"};
  return w;
}

}  // namespace

const std::vector<std::string>& everyday_nouns() {
  static const std::vector<std::string> w = {
      "apple", "banana", "car",    "chair",  "tree",   "house",    "dog",    "cat",    "bird",   "fish",
      "flower", "cup",   "book",   "clock",  "lamp",   "boat",     "train",  "bicycle", "guitar", "kite",
      "key",   "spoon",  "phone",  "umbrella", "ball", "cloud",    "moon",   "leaf",   "window", "door",
      "bottle", "pencil", "rocket", "horse",  "table",  "bridge",   "candle", "drum",   "egg",    "mountain"};
  return w;
}

namespace {

// Deterministic draws for one sample: splitmix64 steps from (seed, index).
struct Draw {
  uint64_t s;
  uint64_t next() { return s = mix_seed(s, 0x1757); }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  template <class T> const T& pick(const std::vector<T>& v) { return v[static_cast<size_t>(below(static_cast<int64_t>(v.size())))]; }
  template <class T> void shuffle(std::vector<T>& v) {
    for (int64_t i = static_cast<int64_t>(v.size()) - 1; i > 0; --i) std::swap(v[i], v[below(i + 1)]);
  }
};

std::string article(const std::string& noun) {
  return !noun.empty() && std::string("aeiouAEIOU").find(noun[0]) != std::string::npos ? "an" : "a";
}

std::string capitalised(std::string s) {
  if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
  return s;
}


// The correct option plus `extra` distractors from `vocab`, shuffled.
std::vector<std::string> options(Draw& d, const std::string& correct, std::vector<std::string> vocab, int64_t extra) {
  vocab.erase(std::remove(vocab.begin(), vocab.end(), correct), vocab.end());
  d.shuffle(vocab);
  vocab.resize(static_cast<size_t>(std::min<int64_t>(extra, static_cast<int64_t>(vocab.size()))));
  vocab.push_back(correct);
  d.shuffle(vocab);
  return vocab;
}

// Each option written in one of its surface forms ("blue", "bluish", "blue-coloured"; "small", "little", "tiny"),
// so the answer can only be written by copying it from the list. Returns the true option's form.
std::string render_options(Draw& d, std::vector<std::string>& opts, const std::string& truth) {
  static const std::map<std::string, std::vector<std::string>> forms = [] {
    std::map<std::string, std::vector<std::string>> m;
    const std::map<std::string, std::string> ish = {{"white", "whitish"}, {"grey", "greyish"}, {"black", "blackish"},
                                                    {"red", "reddish"},   {"orange", "orangish"}, {"yellow", "yellowish"},
                                                    {"green", "greenish"}, {"blue", "bluish"},   {"purple", "purplish"}};
    for (const auto& [c, i] : ish) m[c] = {c, i, c + "-coloured"};
    m["top left"] = {"top left", "upper left", "top-left corner"};
    m["top right"] = {"top right", "upper right", "top-right corner"};
    m["bottom left"] = {"bottom left", "lower left", "bottom-left corner"};
    m["bottom right"] = {"bottom right", "lower right", "bottom-right corner"};
    // No form starts with an article or says "single": "It is a ..." and "a single object" belong to other texts.
    m["one"] = {"one", "just one", "only one"};
    m["two"] = {"two", "two of them", "exactly two"};
    m["three"] = {"three", "exactly three", "three of them"};
    m["four"] = {"four", "exactly four", "four of them"};
    m["large"] = {"large", "big", "full size"};
    m["small"] = {"small", "little", "tiny"};
    return m;
  }();
  std::string out;
  for (auto& o : opts) {
    const bool is_truth = o == truth;
    o = d.pick(forms.at(o));
    if (is_truth) out = o;
  }
  return out;
}

// A multiple-choice instruction in one of three phrasings.
std::string choice_question(Draw& d, const std::string& lead, const std::string& kind_word,
                            const std::vector<std::string>& opts) {
  const std::string list = detail::join(opts, ", ");
  switch (d.below(3)) {
    case 0: return lead + " Please only answer a single " + kind_word + " in " + list + ".";
    case 1: return lead + " Choose one of: " + list + ".";
    default: return lead + " Options: " + list + ". Answer with one option.";
  }
}

// What an attribute question shows and asks: the composite layout, the one true word, the words of its
// attribute, and the other words that are also true of that image (never offered as distractors).
struct Fact {
  std::vector<int> cells;  // quadrant cells 0..3 holding a half-size copy; {4} = centre; empty = the plain image
  std::string word, kind_word;
  std::vector<std::string> vocab, also_true;
};

Fact attribute_fact(InstructionKind k, const std::string& colour, Draw& d) {
  Fact f;
  switch (k) {
    case InstructionKind::colour:
      f = {{}, colour, "colour", colour_words(), {"large", "one"}};
      break;
    case InstructionKind::position: {
      const int cell = static_cast<int>(d.below(4));
      f = {{cell}, position_words()[static_cast<size_t>(cell)], "position", position_words(), {colour, "one", "small"}};
      break;
    }
    case InstructionKind::count: {
      const int n = 1 + static_cast<int>(d.below(4));
      std::vector<int> cells = {0, 1, 2, 3};
      d.shuffle(cells);
      cells.resize(static_cast<size_t>(n));
      std::sort(cells.begin(), cells.end());
      f = {cells, count_words()[static_cast<size_t>(n - 1)], "count", count_words(), {colour, "small"}};
      break;
    }
    default: {
      const bool small = d.below(2) == 0;
      f = {small ? std::vector<int>{4} : std::vector<int>{}, small ? "small" : "large", "size", size_words(),
           {colour, "one"}};
      break;
    }
  }
  return f;
}

std::string attribute_lead(InstructionKind k, bool first, const std::string& thing, const std::string& things) {
  // Each lead opens with what it asks (colour, where, how many, how big); none opens with "What is", which is
  // the naming questions' opening.
  switch (k) {
    case InstructionKind::colour:
      return first ? "What colour does the " + thing + " have?" : "Which colour is the " + thing + " drawn in?";
    case InstructionKind::position:
      return first ? "Where in the picture is the " + thing + "?" : "In which part of the picture is the " + thing + "?";
    case InstructionKind::count:
      return first ? "How many " + things + " does the picture hold?" : "Count the " + things + " in the picture.";
    default:
      return first ? "How big is the " + thing + " drawn?" : "What size does the " + thing + " have?";
  }
}

// Median colour of the border pixels: [C] float.
torch::Tensor border_colour(const torch::Tensor& t) {
  const int64_t H = t.size(0), W = t.size(1);
  auto border = torch::cat({t[0], t[H - 1], t.select(1, 0), t.select(1, W - 1)}, 0);  // [2H+2W, C]
  return std::get<0>(border.median(0));
}

}  // namespace

const char* instruction_kind_name(InstructionKind k) {
  switch (k) {
    case InstructionKind::caption: return "caption";
    case InstructionKind::short_answer: return "short_answer";
    case InstructionKind::yes_no: return "yes_no";
    case InstructionKind::colour: return "colour";
    case InstructionKind::position: return "position";
    case InstructionKind::count: return "count";
    case InstructionKind::size: return "size";
    case InstructionKind::choice: return "choice";
    case InstructionKind::pick: return "pick";
    case InstructionKind::copy: return "copy";
  }
  return "?";
}

std::string foreground_colour(const torch::Tensor& hwc_uint8) {
  TORCH_CHECK(hwc_uint8.dim() == 3 && (hwc_uint8.size(2) == 1 || hwc_uint8.size(2) == 3) && hwc_uint8.size(0) > 1 &&
                  hwc_uint8.size(1) > 1,
              "foreground_colour: expected uint8 [H, W, 1|3], got ", hwc_uint8.sizes());
  auto t = hwc_uint8.to(torch::kFloat);
  if (t.size(2) == 1) t = t.expand({t.size(0), t.size(1), 3});
  auto bg = border_colour(t);
  auto dist = (t - bg).abs().sum(-1);  // [H, W]
  auto mask = dist > 90.0;
  const int64_t need = std::max<int64_t>(4, t.size(0) * t.size(1) / 50);
  if (mask.sum().item<int64_t>() < need) {
    // Faint foreground: the most distant tenth of the pixels.
    auto flat = dist.flatten();
    auto k = std::max<int64_t>(1, flat.numel() / 10);
    auto thr = std::get<0>(flat.topk(k)).min();
    mask = dist >= thr;
  }
  auto fg = t.index({mask}).mean(0);  // [3]
  const double r = fg[0].item<double>(), g = fg[1].item<double>(), b = fg[2].item<double>();
  const double mx = std::max({r, g, b}), mn = std::min({r, g, b});
  const double v = mx / 255.0, s = mx > 0 ? (mx - mn) / mx : 0.0;
  if (s < 0.25) return v > 0.75 ? "white" : v < 0.3 ? "black" : "grey";
  double h;  // degrees
  if (mx == r) h = 60.0 * std::fmod((g - b) / (mx - mn) + 6.0, 6.0);
  else if (mx == g) h = 60.0 * ((b - r) / (mx - mn) + 2.0);
  else h = 60.0 * ((r - g) / (mx - mn) + 4.0);
  // Boundaries halfway between the hues of the colour names (red 0, orange 28, yellow 56, green 120, blue 224,
  // purple 284 degrees).
  if (h < 14 || h >= 322) return "red";
  if (h < 42) return "orange";
  if (h < 88) return "yellow";
  if (h < 172) return "green";
  if (h < 254) return "blue";
  return "purple";
}

struct InstructionDataset::Plan {
  InstructionKind kind;
  std::string question, answer;
  std::vector<int> cells;  // as Fact::cells
};

InstructionDataset::InstructionDataset(std::shared_ptr<ImageDataset> pool, InstructionOptions opts)
    : pool_(std::move(pool)), opts_(opts) {
  if (!pool_) throw Error("[pretrain] instruction set: no pool dataset");
  if (pool_->class_names().empty())
    throw ConfigError(fmt::format("[pretrain] instruction set over '{}': the dataset has no class names",
                                  pool_->name()));
  set_name(pool_->name());
  set_class_names(pool_->class_names());
  if (opts_.distractors.empty()) opts_.distractors = everyday_nouns();
  if (!opts_.captions_only) {
    colour_.resize(static_cast<size_t>(pool_->size()));
    const auto& words = colour_words();
    for (int64_t i = 0; i < pool_->size(); ++i) {
      const auto c = foreground_colour(pool_->image(i));
      colour_[static_cast<size_t>(i)] = static_cast<uint8_t>(std::find(words.begin(), words.end(), c) - words.begin());
    }
  }
}

InstructionDataset::InstructionDataset(const InstructionDataset& like, std::vector<std::string> words)
    : InstructionDataset(like) {
  opts_.words = std::move(words);
}

InstructionKind InstructionDataset::kind(int64_t i) const {
  if (opts_.captions_only) return InstructionKind::caption;
  // Shares out of 100: captions and short answers teach label words; yes/no ties them to the image; attribute
  // questions teach answering one option from a list, mixed-attribute lists ("choice") teach reading the list to
  // know what is asked, and "pick" lists name the image among unrelated things (never a study's label list).
  const int64_t r = static_cast<int64_t>(mix_seed(mix_seed(opts_.seed, 0xC0FFEE), static_cast<uint64_t>(i)) % 100);
  if (r < 15) return InstructionKind::caption;
  if (r < 25) return InstructionKind::short_answer;
  if (r < 40) return InstructionKind::yes_no;
  if (r < 47) return InstructionKind::colour;
  if (r < 53) return InstructionKind::position;
  if (r < 59) return InstructionKind::count;
  if (r < 62) return InstructionKind::size;
  if (r < 74) return InstructionKind::choice;
  if (r < 92 || opts_.words.empty()) return InstructionKind::pick;
  return InstructionKind::copy;
}

// Writes the question and answer of one sample; one method per instruction kind.
struct InstructionDataset::Planner {
  const InstructionDataset& ds;
  int64_t i, c;               // sample index, its class
  const std::string& label;   // its class name
  Draw& d;
  Plan& p;
  bool dig;
  std::string thing, things;  // the attribute questions' noun: "digit" or "figure", never the study's "object"

  std::string named(const std::string& x) const { return dig ? "the digit " + x : article(x) + " " + x; }

  void caption() {
    p.question = d.pick(std::vector<std::string>{"Describe the image briefly.", "Write a short caption for this picture.",
                                                 "What does this picture show? Answer in a few words."});
    p.answer = dig ? d.pick(std::vector<std::string>{"A handwritten digit " + label + ".",
                                                     "The digit " + label + ", written by hand.",
                                                     "This is a picture of the digit " + label + "."})
                   : d.pick(std::vector<std::string>{"A picture of " + named(label) + ".",
                                                     capitalised(named(label)) + ".",
                                                     "This is a picture of " + named(label) + "."});
  }

  // short_answer and pick: the same leads with and without an option list, answered in one form ("It is a
  // kite."): every naming question, listed or open, has one way to be answered, and a list only constrains the
  // word. Naming leads, and only they, open with "What is". "pick" offers the image's own name among things it
  // is not: everyday nouns no study uses and at most one label of each other dataset; never two labels of one
  // dataset, so no study's list, or part of one, is ever practised (unless pretrain.pick_own_labels asks for
  // that). A generic pool (same_kind_lists: the rendered letters) offers its own other labels instead, sometimes
  // with everyday nouns, so its lists can only be answered by looking at the image. Lists run from 3 to 21
  // options, as long as the study's ten-label lists and longer.
  void naming() {
    const int64_t li = d.below(4);
    const std::string lead =
        dig ? std::vector<std::string>{"What is the digit in this picture?", "What is written in the picture?",
                                       "Which digit is written here?", "Read the handwritten digit."}[li]
            : std::vector<std::string>{"What is the thing in this picture?", "What is shown in the picture?",
                                       "What can you see in the image?", "Name the thing in the picture."}[li];
    if (p.kind == InstructionKind::pick) {
      std::vector<std::string> others;
      if (ds.opts_.same_kind_lists) {
        for (const auto& n : ds.class_names())
          if (n != label) others.push_back(n);
        if (d.below(3) == 0) others.insert(others.end(), ds.opts_.distractors.begin(), ds.opts_.distractors.end());
      } else {
        others = ds.opts_.distractors;
      }
      for (const auto& list : ds.opts_.other_labels)
        if (!list.empty() && d.below(3) == 0) others.push_back(d.pick(list));
      auto opts = options(d, label, others, 2 + d.below(19));
      if (ds.opts_.own_labels > 0) {  // an experiment (pretrain.pick_own_labels): same-dataset distractors
        std::vector<std::string> own;
        for (const auto& n : ds.class_names())
          if (n != label && std::find(opts.begin(), opts.end(), n) == opts.end()) own.push_back(n);
        d.shuffle(own);
        // never every label of the dataset: at least one stays out, so the list is never the study's whole list
        const int64_t room = static_cast<int64_t>(ds.class_names().size()) - 2;
        own.resize(static_cast<size_t>(std::max<int64_t>(0, std::min<int64_t>({ds.opts_.own_labels, room,
                                                                                static_cast<int64_t>(own.size())}))));
        for (const auto& n : own) opts.insert(opts.begin() + d.below(static_cast<int64_t>(opts.size()) + 1), n);
      }
      // an experiment (pretrain.pick_unlisted): the true name left out, answered all the same
      if (ds.opts_.unlisted_percent > 0 && d.below(100) < ds.opts_.unlisted_percent && opts.size() > 2)
        opts.erase(std::find(opts.begin(), opts.end(), label));
      p.question = choice_question(d, lead, dig ? "digit" : "object", opts);
    } else {
      p.question = lead;
    }
    p.answer = "It is " + article(label) + " " + label + ".";
  }

  void yes_no() {
    const auto& names = ds.class_names();
    const bool yes = d.below(2) == 0 || names.size() < 2;
    std::string x = label;
    if (!yes) {
      int64_t o = d.below(static_cast<int64_t>(names.size()) - 1);
      if (o >= c) ++o;
      x = names[static_cast<size_t>(o)];
    }
    p.question = d.below(2) == 0 ? "Is this " + named(x) + "? Answer yes or no."
                                 : "Does the picture show " + named(x) + "? Please answer yes or no.";
    p.answer = d.below(2) == 0 ? (yes ? "Yes." : "No.") : (yes ? "Yes, it is." : "No, it is not.");
  }

  // colour, position, count, size: an open question or a list of that attribute's words, answered in one
  // sentence that names the attribute ("The colour is bluish."), never the bare word.
  void attribute() {
    Fact f = attribute_fact(p.kind, colour_words()[ds.colour_[static_cast<size_t>(i)]], d);
    p.cells = f.cells;
    const std::string lead = attribute_lead(p.kind, d.below(2) == 0, thing, things);
    auto form = [&](const std::string& w) { return "The " + f.kind_word + " is " + w + "."; };
    if (d.below(10) < 3) {  // an open question, answered with the plain word
      p.question = lead;
      p.answer = form(f.word);
      return;
    }
    auto opts = options(d, f.word, f.vocab, 1 + d.below(static_cast<int64_t>(f.vocab.size()) - 1));
    p.answer = form(render_options(d, opts, f.word));
    p.question = choice_question(d, lead, f.kind_word, opts);
  }

  // Writing: a few words of the language in random order, repeated. A stand-in for the text pretraining of a
  // real LLM, which can write every word of its tokenizer's language; random order never forms a sentence.
  void copy() {
    std::vector<std::string> w;
    for (int64_t k = 0, n = 2 + d.below(5); k < n; ++k) w.push_back(d.pick(ds.opts_.words));
    p.question = d.pick(std::vector<std::string>{"Repeat these words:", "Write these words again:",
                                                 "Copy the following words:"}) + " " + detail::join(w, " ") + ".";
    p.answer = detail::join(w, " ") + ".";
  }

  // One true attribute word among false ones of every attribute: the list, not the lead, says what is asked.
  void choice() {
    const InstructionKind sub = std::array<InstructionKind, 4>{InstructionKind::colour, InstructionKind::position,
                                                               InstructionKind::count, InstructionKind::size}[d.below(4)];
    Fact f = attribute_fact(sub, colour_words()[ds.colour_[static_cast<size_t>(i)]], d);
    p.cells = f.cells;
    std::vector<std::string> vocab;
    for (const auto* v : {&colour_words(), &position_words(), &count_words(), &size_words()})
      for (const auto& w : *v)
        if (w != f.word && std::find(f.also_true.begin(), f.also_true.end(), w) == f.also_true.end()) vocab.push_back(w);
    auto opts = options(d, f.word, vocab, 3 + d.below(7));
    const std::string word = render_options(d, opts, f.word);
    const int64_t li = d.below(4);
    p.answer = "The answer is " + word + ".";
    const std::string lead = std::vector<std::string>{
        "Which of these words fits the picture?", "Pick the word that matches the image.",
        "Which option describes the picture?", "Look at the image and choose the right word."}[li];
    p.question = choice_question(d, lead, "word", opts);
  }
};

InstructionDataset::Plan InstructionDataset::plan(int64_t i) const {
  TORCH_CHECK(i >= 0 && i < size(), "instruction set ", name(), ": index ", i, " out of range ", size());
  const int64_t c = pool_->label(i);
  if (c < 0 || c >= static_cast<int64_t>(class_names().size()))
    throw FormatError(fmt::format("[pretrain] {}: label {} outside the {} class names", pool_->source(i), c,
                                  class_names().size()));
  const std::string& label = class_names()[static_cast<size_t>(c)];
  Draw d{mix_seed(mix_seed(opts_.seed, 0xD1CE), static_cast<uint64_t>(i))};
  Plan p;
  p.kind = kind(i);
  const bool dig = opts_.digits;
  Planner w{*this, i, c, label, d, p, dig, dig ? "digit" : "figure", dig ? "digits" : "figures"};
  switch (p.kind) {
    case InstructionKind::caption: w.caption(); break;
    case InstructionKind::short_answer:
    case InstructionKind::pick: w.naming(); break;
    case InstructionKind::yes_no: w.yes_no(); break;
    case InstructionKind::colour:
    case InstructionKind::position:
    case InstructionKind::count:
    case InstructionKind::size: w.attribute(); break;
    case InstructionKind::copy: w.copy(); break;
    case InstructionKind::choice: w.choice(); break;
  }
  return p;
}

torch::Tensor InstructionDataset::image(int64_t i) const {
  const Plan p = plan(i);
  auto img = pool_->image(i);
  if (p.cells.empty()) return img;
  // img: [H, W, C] uint8 -> composite [H, W, C] uint8 on the image's border colour
  const int64_t H = img.size(0), W = img.size(1), C = img.size(2);
  auto f = img.to(torch::kFloat);
  auto bg = border_colour(f);
  auto canvas = bg.view({1, 1, C}).expand({H, W, C}).clone();
  const int64_t h = H / 2, w = W / 2;
  auto small = torch::nn::functional::interpolate(
                   f.permute({2, 0, 1}).unsqueeze(0),
                   torch::nn::functional::InterpolateFuncOptions().size(std::vector<int64_t>{h, w}).mode(torch::kArea))
                   .squeeze(0)
                   .permute({1, 2, 0});
  for (int cell : p.cells) {
    const int64_t y = cell == 4 ? H / 4 : (cell / 2) * (H - h), x = cell == 4 ? W / 4 : (cell % 2) * (W - w);
    canvas.slice(0, y, y + h).slice(1, x, x + w).copy_(small);
  }
  return canvas.round().clamp(0, 255).to(torch::kUInt8).contiguous();
}

std::string InstructionDataset::source(int64_t i) const {
  return pool_->source(i) + " [" + instruction_kind_name(kind(i)) + "]";
}

std::pair<std::string, std::string> InstructionDataset::text(int64_t i) const {
  Plan p = plan(i);
  return {std::move(p.question), std::move(p.answer)};
}

std::vector<std::string> study_texts(const RunConfig& cfg,
                                     const std::vector<std::pair<std::string, std::vector<std::string>>>& class_names) {
  std::vector<std::string> out;
  auto add = [&](const std::string& s) {
    if (!s.empty() && std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  };
  add(cfg.finetune.question);
  for (const auto& [name, names] : class_names) {
    auto it = cfg.data.datasets.find(name);
    if (it == cfg.data.datasets.end())
      throw ConfigError(fmt::format("[pretrain] study texts: '{}' is not in data.datasets", name));
    const DatasetConfig& dc = it->second;
    add(dataset_question(name, dc, names));
    if (names.size() >= 3) add(detail::join(names, ", "));  // the label list itself, wherever it would appear
    for (const auto& n : names) add(answer_text(dc, n));
    const auto at = dc.answer.find("{label}");
    if (at != std::string::npos && at >= 6) add(dc.answer.substr(0, at));  // "The object is a(n) "
  }
  return out;
}

namespace {
// True when `c` is one item of an option list in `q` (", c,", ": c.", " in c," ...).
bool listed(const std::string& q, const std::string& c) {
  for (const char* pre : {", ", ": ", " in "})
    for (const char* post : {",", "."})
      if (q.find(pre + c + post) != std::string::npos) return true;
  return false;
}
}  // namespace

std::vector<std::string> study_text_leaks(
    const ImageDataset& ds, const std::vector<std::string>& forbidden,
    const std::vector<std::pair<std::string, std::vector<std::string>>>& class_names, int64_t own_labels) {
  std::vector<std::string> leaks;
  for (int64_t i = 0; i < ds.size(); ++i) {
    const auto [q, a] = ds.text(i);
    std::string why;
    for (const auto& f : forbidden)
      if (q.find(f) != std::string::npos || a.find(f) != std::string::npos) {
        why = "contains '" + f + "'";
        break;
      }
    for (const auto& [name, names] : class_names) {
      if (!why.empty()) break;
      std::vector<std::string> hit;
      for (const auto& c : names)
        if (listed(q, c)) hit.push_back(c);
      if (static_cast<int64_t>(hit.size()) > 1 + own_labels)
        why = "lists " + detail::join(hit, ", ") + " of '" + name + "'";
    }
    if (!why.empty()) leaks.push_back(ds.source(i) + ": '" + q + "' -> '" + a + "' " + why);
  }
  return leaks;
}

}  // namespace emt
