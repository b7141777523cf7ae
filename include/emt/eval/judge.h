// The paper's judge: a model asked whether a prediction names the label, answering yes or no. Either an external
// command (JSON on stdin, yes/no on stdout) or an OpenAI-compatible chat endpoint over HTTP, behind a cache of
// answers so that re-scoring asks nothing twice. A config never runs a program or contacts a host by itself.
// Rules: docs/scoring.md ("Judge").
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>

namespace emt {

struct RunConfig;

// The paper's judge question with label and prediction filled in.
std::string judge_question(const std::string& label, const std::string& prediction);
// Runs `command` with /bin/sh -c, writes {"question", "label", "prediction"} as one JSON line on its stdin and
// reads its stdout: the first word, case-insensitive and without trailing punctuation, must be yes or no.
// Throws emt::Error naming the command and what it printed on a non-zero exit, a signal, or any other answer.
bool judge_says_yes(const std::string& command, const std::string& label, const std::string& prediction);

// A config never runs a program or contacts a host by itself: the Evaluator refuses a configured judge (the judge
// scorer with eval.judge_command or eval.judge_url) unless the process allowed it, which the CLI does for
// --allow-judge and a library user does in code. Off by default. A Judge built in code is not gated.
void allow_config_judge(bool allowed);
bool config_judge_allowed();

struct JudgeOptions {
  std::string command;  // an external command (judge_says_yes), or
  std::string url;      // an OpenAI-compatible API base URL: POST <url>/chat/completions
  std::string model;    // the endpoint's model name (required with url)
  std::string api_key_env = "OPENAI_API_KEY";  // the variable holding the key; unset or empty: no key is sent
  double timeout_s = 30;                       // per request, connection included
  int64_t retries = 3;                         // further tries after a timeout, a connection error, 408, 429, 5xx
  double retry_delay_s = 1;                    // before retry k (1-based): retry_delay_s * 2^(k-1)
  std::string cache;                           // JSON-lines file of earlier answers; "" = none
};
// The judge settings of a config (eval.judge_*); the cache defaults to <run.out_dir>/<run.name>/judge_cache.jsonl.
JudgeOptions judge_options(const RunConfig& cfg);

class Judge {
 public:
  // ConfigError when neither or both of command and url are set, url is not http(s)://, model is missing with a
  // url, or timeout/retries/delay are out of range. Reads the cache file when it exists: FormatError naming
  // file:line for a corrupt line (a truncated last line, left by a killed process, is skipped with a warning).
  explicit Judge(JudgeOptions opts);
  ~Judge();
  Judge(const Judge&) = delete;
  Judge& operator=(const Judge&) = delete;

  // The judge's answer for (label, prediction): from the cache when this judge answered it before, else asked
  // and appended to the cache. HTTP: the question is one user message, temperature 0; the reply's first word
  // must be yes or no. Throws emt::Error naming the endpoint (never the key) and the last status or error once
  // the retries are spent, at once for any other HTTP status or a reply without a yes/no.
  bool says_yes(const std::string& label, const std::string& prediction);

  const JudgeOptions& options() const;
  std::string describe() const;  // "command '...'" | "model M at URL": also the cache's judge key
  int64_t asked() const;         // questions sent (commands run or HTTP requests made, retries included)
  int64_t cached() const;        // answers served from the cache

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace emt
