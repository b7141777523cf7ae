// The judge: an external command or an OpenAI-compatible chat endpoint (libcurl), behind a cache of answers.
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/metrics.h>
#include <emt/core/runtime.h>
#include <emt/eval/judge.h>
#include "core/logging.h"
#include "core/text.h"
#ifdef EMT_WITH_CURL
#include <curl/curl.h>
#endif
#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <tuple>

extern char** environ;

namespace emt {

namespace fs = std::filesystem;

// ---- the command judge ---------------------------------------------------------------------------------------------

std::string judge_question(const std::string& label, const std::string& prediction) {
  return "Is the \"Prediction\" correctly predicting the right \"Label\"? Label: " + label +
         "; Prediction: " + prediction + ".";
}

namespace {

// The first word of a judge's reply, case-insensitive, punctuation around it ignored: 1 yes, 0 no, -1 other.
int yes_or_no(const std::string& reply) {
  std::istringstream is(reply);
  std::string word;
  is >> word;
  std::string w;
  for (char c : word) w.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  while (!w.empty() && std::ispunct(static_cast<unsigned char>(w.back()))) w.pop_back();
  while (!w.empty() && std::ispunct(static_cast<unsigned char>(w.front()))) w.erase(w.begin());
  return w == "yes" ? 1 : w == "no" ? 0 : -1;
}

std::string clip_text(const std::string& s, size_t max = 300) {
  std::string t = detail::trim(s);
  return t.size() <= max ? t : t.substr(0, max) + "...";
}

struct ChildOutput {
  int status = 0;
  std::string out, err;
};

// Runs `sh -c command`, feeding `input` on stdin while draining stdout and stderr (no deadlock on big outputs;
// a child that never reads stdin is fine: SIGPIPE is blocked and EPIPE ends the writing).
ChildOutput run_with_pipes(const std::string& command, const std::string& input) {
  int in[2], out[2], err[2];
  if (::pipe2(in, O_CLOEXEC) != 0) throw IoError(fmt::format("[judge] pipe: {}", std::strerror(errno)));
  if (::pipe2(out, O_CLOEXEC) != 0) {
    ::close(in[0]); ::close(in[1]);
    throw IoError(fmt::format("[judge] pipe: {}", std::strerror(errno)));
  }
  if (::pipe2(err, O_CLOEXEC) != 0) {
    for (int fd : {in[0], in[1], out[0], out[1]}) ::close(fd);
    throw IoError(fmt::format("[judge] pipe: {}", std::strerror(errno)));
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in[0], 0);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  std::string sh = "/bin/sh", dash_c = "-c", cmd = command;
  char* argv[] = {sh.data(), dash_c.data(), cmd.data(), nullptr};
  pid_t pid = -1;
  int rc = posix_spawn(&pid, "/bin/sh", &fa, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(in[0]);
  ::close(out[1]);
  ::close(err[1]);
  if (rc != 0) {
    ::close(in[1]); ::close(out[0]); ::close(err[0]);
    throw IoError(fmt::format("[judge] cannot start '{}': {}", command, std::strerror(rc)));
  }

  sigset_t pipe_set, old_set;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old_set);
  ::fcntl(in[1], F_SETFL, ::fcntl(in[1], F_GETFL) | O_NONBLOCK);

  ChildOutput res;
  size_t written = 0;
  int in_fd = in[1];
  if (input.empty()) { ::close(in_fd); in_fd = -1; }
  bool out_open = true, err_open = true;
  char buf[4096];
  while (out_open || err_open) {
    pollfd fds[3];
    int nf = 0, i_out = -1, i_err = -1, i_in = -1;
    if (out_open) { fds[nf] = {out[0], POLLIN, 0}; i_out = nf++; }
    if (err_open) { fds[nf] = {err[0], POLLIN, 0}; i_err = nf++; }
    if (in_fd >= 0) { fds[nf] = {in_fd, POLLOUT, 0}; i_in = nf++; }
    if (::poll(fds, nf, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (i_in >= 0 && fds[i_in].revents) {
      ssize_t w = ::write(in_fd, input.data() + written, input.size() - written);
      if (w > 0) written += static_cast<size_t>(w);
      if ((w < 0 && errno != EAGAIN && errno != EINTR) || written == input.size() || (fds[i_in].revents & POLLERR)) {
        ::close(in_fd);
        in_fd = -1;
      }
    }
    for (auto [idx, fd, open, dst] : {std::tuple<int, int, bool*, std::string*>{i_out, out[0], &out_open, &res.out},
                                      std::tuple<int, int, bool*, std::string*>{i_err, err[0], &err_open, &res.err}}) {
      if (idx < 0 || !fds[idx].revents) continue;
      ssize_t r = ::read(fd, buf, sizeof buf);
      if (r > 0) dst->append(buf, static_cast<size_t>(r));
      else if (r == 0 || (errno != EINTR && errno != EAGAIN)) *open = false;
    }
  }
  if (in_fd >= 0) ::close(in_fd);
  ::close(out[0]);
  ::close(err[0]);
  while (::waitpid(pid, &res.status, 0) < 0 && errno == EINTR) {
  }
  // Swallow a SIGPIPE raised by our own write before restoring the mask.
  timespec zero{0, 0};
  while (sigtimedwait(&pipe_set, nullptr, &zero) > 0) {
  }
  pthread_sigmask(SIG_SETMASK, &old_set, nullptr);
  return res;
}

}  // namespace

namespace {
std::atomic<bool> g_config_judge_allowed{false};
}  // namespace

void allow_config_judge(bool allowed) { g_config_judge_allowed = allowed; }
bool config_judge_allowed() { return g_config_judge_allowed.load(); }

bool judge_says_yes(const std::string& command, const std::string& label, const std::string& prediction) {
  if (detail::trim(command).empty()) throw ConfigError("[judge] empty judge command (eval.judge_command)");
  nlohmann::ordered_json q;
  q["question"] = judge_question(label, prediction);
  q["label"] = label;
  q["prediction"] = prediction;
  ChildOutput r = run_with_pipes(command, q.dump() + "\n");
  if (!WIFEXITED(r.status) || WEXITSTATUS(r.status) != 0) {
    std::string how = WIFEXITED(r.status) ? fmt::format("exited with status {}", WEXITSTATUS(r.status))
                                          : fmt::format("was killed by signal {}", WTERMSIG(r.status));
    throw Error(fmt::format("[judge] command '{}' {}; stdout: '{}'; stderr: '{}'", command, how, clip_text(r.out),
                            clip_text(r.err)));
  }
  if (int yes = yes_or_no(r.out); yes >= 0) return yes == 1;
  throw Error(fmt::format("[judge] command '{}' answered '{}' (expected yes or no as the first word); stderr: '{}'",
                          command, clip_text(r.out), clip_text(r.err)));
}

// ---- the HTTP judge ---------------------------------------------------------------------------------------------

JudgeOptions judge_options(const RunConfig& cfg) {
  const auto& e = cfg.eval;
  JudgeOptions o;
  o.command = e.judge_command;
  o.url = e.judge_url;
  o.model = e.judge_model;
  o.api_key_env = e.judge_api_key_env;
  o.timeout_s = e.judge_timeout_s;
  o.retries = e.judge_retries;
  o.cache = !e.judge_cache.empty() ? e.judge_cache
                                   : (fs::path(cfg.run.out_dir) / cfg.run.name / "judge_cache.jsonl").string();
  return o;
}

namespace {

#ifdef EMT_WITH_CURL
std::once_flag g_curl_once;

size_t append_body(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

struct HttpReply {
  CURLcode code = CURLE_OK;
  long status = 0;
  std::string body, error;
};

// One POST of a JSON body; no redirects, http(s) only.
HttpReply post_json(const std::string& endpoint, const std::string& body, const std::string& key, double timeout_s) {
  std::call_once(g_curl_once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  HttpReply r;
  CURL* h = curl_easy_init();
  if (!h) throw Error("[judge] cannot start an HTTP client (curl_easy_init failed)");
  char err[CURL_ERROR_SIZE] = {0};
  curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/json");
  std::string auth;
  if (!key.empty()) {
    auth = "Authorization: Bearer " + key;
    headers = curl_slist_append(headers, auth.c_str());
  }
  const long ms = static_cast<long>(std::lround(timeout_s * 1000));
  curl_easy_setopt(h, CURLOPT_URL, endpoint.c_str());
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body.c_str());
  curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, static_cast<long>(body.size()));
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, ms);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, ms);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &r.body);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, err);
  r.code = curl_easy_perform(h);
  if (r.code == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r.status);
  else r.error = err[0] ? std::string(err) : std::string(curl_easy_strerror(r.code));
  curl_slist_free_all(headers);
  curl_easy_cleanup(h);
  if (!auth.empty()) std::fill(auth.begin(), auth.end(), '\0');
  return r;
}

bool retryable(const HttpReply& r) {
  if (r.code != CURLE_OK) return true;  // timeouts, refused or reset connections, DNS
  return r.status == 408 || r.status == 429 || r.status >= 500;
}
#else
constexpr int CURLE_OK = 0;
struct HttpReply {
  int code = CURLE_OK;
  long status = 0;
  std::string body, error;
};
// The Judge refuses an endpoint in this build before anything is asked (see its constructor).
HttpReply post_json(const std::string&, const std::string&, const std::string&, double) {
  throw Error("[judge] this emt was built without libcurl (EMT_WITH_CURL=OFF)");
}
bool retryable(const HttpReply&) { return false; }
#endif

}  // namespace

struct Judge::Impl {
  JudgeOptions o;
  std::string id;
  std::map<std::pair<std::string, std::string>, bool> memo;  // (label, prediction) -> yes
  std::unique_ptr<JsonlWriter> cache_out;
  int64_t asked = 0, cached = 0;
  bool key_warned = false;

  void load_cache() {
    if (o.cache.empty() || !fs::exists(o.cache)) return;
    std::ifstream f(o.cache);
    if (!f) throw IoError(fmt::format("[judge] cannot read the judge cache {}", o.cache));
    std::vector<std::string> lines;
    for (std::string l; std::getline(f, l);) lines.push_back(l);
    for (size_t i = 0; i < lines.size(); ++i) {
      if (detail::trim(lines[i]).empty()) continue;
      const std::string where = fmt::format("{}:{}", o.cache, i + 1);
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(lines[i]);
        if (!j.is_object() || !j["judge"].is_string() || !j["label"].is_string() || !j["prediction"].is_string() ||
            !j["yes"].is_boolean())
          throw FormatError("fields judge, label, prediction (strings) and yes (boolean) expected");
      } catch (const std::exception& e) {
        if (i + 1 == lines.size()) {
          log_warn("[judge] {}: skipping a truncated last line ({})", where, e.what());
          continue;
        }
        throw FormatError(fmt::format("[judge] {}: not a judge cache line: {}", where, e.what()));
      }
      if (j["judge"].get<std::string>() == id)
        memo[{j["label"].get<std::string>(), j["prediction"].get<std::string>()}] = j["yes"].get<bool>();
    }
  }

  bool ask_http(const std::string& label, const std::string& prediction) {
    const std::string endpoint = detail::trim(o.url).back() == '/' ? o.url + "chat/completions"
                                                                  : o.url + "/chat/completions";
    nlohmann::json body = {{"model", o.model},
                           {"messages", {{{"role", "user"}, {"content", judge_question(label, prediction)}}}},
                           {"temperature", 0},
                           {"max_tokens", 8}};
    const char* key = o.api_key_env.empty() ? nullptr : std::getenv(o.api_key_env.c_str());
    if ((!key || !*key) && !key_warned) {
      log_warn("[judge] ${} is not set: requests to {} carry no API key", o.api_key_env, o.url);
      key_warned = true;
    }
    HttpReply r;
    for (int64_t attempt = 0;; ++attempt) {
      ++asked;
      r = post_json(endpoint, body.dump(), key ? key : "", o.timeout_s);
      if (r.code == CURLE_OK && r.status == 200) break;
      const std::string what = r.code != CURLE_OK ? r.error
                                                  : fmt::format("HTTP {}: {}", r.status, clip_text(r.body));
      if (!retryable(r))
        throw Error(fmt::format("[judge] {} answered {} (not retried)", endpoint, what));
      if (attempt >= o.retries)
        throw Error(fmt::format("[judge] {} failed {} time(s), last: {} (eval.judge_timeout_s = {}, "
                                "eval.judge_retries = {})", endpoint, attempt + 1, what, o.timeout_s, o.retries));
      const double wait = o.retry_delay_s * std::pow(2.0, static_cast<double>(attempt));
      log_warn("[judge] {}: {}; retry {} of {} in {:.1f} s", endpoint, what, attempt + 1, o.retries, wait);
      std::this_thread::sleep_for(std::chrono::duration<double>(wait));
    }
    std::string content;
    try {
      auto j = nlohmann::json::parse(r.body);
      content = j.at("choices").at(0).at("message").at("content").get<std::string>();
    } catch (const std::exception& e) {
      throw Error(fmt::format("[judge] {}: the reply is not a chat completion with choices[0].message.content "
                              "({}): '{}'", endpoint, e.what(), clip_text(r.body)));
    }
    const int yes = yes_or_no(content);
    if (yes < 0)
      throw Error(fmt::format("[judge] {} (model {}) answered '{}' (expected yes or no as the first word)", endpoint,
                              o.model, clip_text(content)));
    return yes == 1;
  }
};

Judge::Judge(JudgeOptions opts) : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  d.o = std::move(opts);
  const bool cmd = !detail::trim(d.o.command).empty(), http = !detail::trim(d.o.url).empty();
  if (cmd == http)
    throw ConfigError(cmd ? "[judge] both eval.judge_command and eval.judge_url are set: choose one"
                          : "[judge] no judge: set eval.judge_command or eval.judge_url");
  if (http) {
    if (d.o.url.rfind("http://", 0) != 0 && d.o.url.rfind("https://", 0) != 0)
      throw ConfigError(fmt::format("[judge] eval.judge_url '{}' must start with http:// or https://", d.o.url));
    if (detail::trim(d.o.model).empty())
      throw ConfigError("[judge] eval.judge_model must name the endpoint's model when eval.judge_url is set");
#ifndef EMT_WITH_CURL
    throw ConfigError(fmt::format("[judge] eval.judge_url '{}': this emt was built without libcurl "
                                  "(EMT_WITH_CURL=OFF), so it has no HTTP judge; use eval.judge_command", d.o.url));
#endif
  }
  if (!(d.o.timeout_s > 0)) throw ConfigError(fmt::format("[judge] eval.judge_timeout_s must be > 0 (got {})", d.o.timeout_s));
  if (d.o.retries < 0) throw ConfigError(fmt::format("[judge] eval.judge_retries must be >= 0 (got {})", d.o.retries));
  if (!(d.o.retry_delay_s >= 0)) throw ConfigError(fmt::format("[judge] retry delay must be >= 0 (got {})", d.o.retry_delay_s));
  d.id = describe();
  d.load_cache();
}

Judge::~Judge() = default;

bool Judge::says_yes(const std::string& label, const std::string& prediction) {
  Impl& d = *impl_;
  if (auto it = d.memo.find({label, prediction}); it != d.memo.end()) {
    ++d.cached;
    return it->second;
  }
  bool yes;
  if (!d.o.command.empty()) {
    ++d.asked;
    yes = judge_says_yes(d.o.command, label, prediction);
  } else {
    yes = d.ask_http(label, prediction);
  }
  d.memo[{label, prediction}] = yes;
  if (!d.o.cache.empty()) {
    if (!d.cache_out) d.cache_out = std::make_unique<JsonlWriter>(d.o.cache);
    d.cache_out->write({{"judge", d.id}, {"label", label}, {"prediction", prediction}, {"yes", yes}});
  }
  return yes;
}

const JudgeOptions& Judge::options() const { return impl_->o; }
std::string Judge::describe() const {
  const auto& o = impl_->o;
  return o.command.empty() ? fmt::format("model {} at {}", o.model, o.url) : fmt::format("command '{}'", o.command);
}
int64_t Judge::asked() const { return impl_->asked; }
int64_t Judge::cached() const { return impl_->cached; }

}  // namespace emt
