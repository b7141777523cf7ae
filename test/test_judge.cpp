// The judge over HTTP against a stub OpenAI-compatible server on loopback: the request it sends, the key it reads
// from the environment (and never writes), retries, timeouts, errors, the answer cache, the refusal of a config's
// endpoint without --allow-judge, and re-scoring a run with it.
#include <catch2/catch.hpp>
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/eval/evaluator.h>
#include <emt/eval/judge.h>
#include <emt/eval/metrics.h>
#include <emt/eval/scoring.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "test/helpers.h"

namespace {

// A chat-completions endpoint on 127.0.0.1 (a free port) that says "Yes." when the question's prediction contains
// its label, "No." otherwise; `fail_first` requests get `fail_status` first; `delay_ms` delays every reply.
struct StubJudgeServer {
  httplib::Server svr;
  std::thread thread;
  int port = 0;
  std::atomic<int> requests{0};
  std::atomic<int> fail_first{0};
  std::atomic<int> fail_status{503};
  std::atomic<int> delay_ms{0};
  std::string reply_override;  // a fixed body instead of a chat completion
  std::mutex mu;
  std::vector<nlohmann::json> bodies;
  std::vector<std::string> auth;

  StubJudgeServer() {
    svr.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      const int k = ++requests;
      if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms.load()));
      {
        std::lock_guard<std::mutex> l(mu);
        bodies.push_back(nlohmann::json::parse(req.body));
        auth.push_back(req.get_header_value("Authorization"));
      }
      if (k <= fail_first) {
        res.status = fail_status;
        res.set_content(R"({"error": {"message": "try later"}})", "application/json");
        return;
      }
      if (!reply_override.empty()) {
        res.set_content(reply_override, "application/json");
        return;
      }
      const std::string q = nlohmann::json::parse(req.body)["messages"][0]["content"];
      // "... Label: <label>; Prediction: <prediction>."
      const auto l0 = q.find("Label: ") + 7, l1 = q.find("; Prediction: ");
      const std::string label = q.substr(l0, l1 - l0), pred = q.substr(l1 + 14);
      const bool yes = pred.find(label) != std::string::npos;
      nlohmann::json out = {{"id", "stub"},
                            {"object", "chat.completion"},
                            {"choices", {{{"index", 0},
                                          {"message", {{"role", "assistant"}, {"content", yes ? "Yes." : "No."}}},
                                          {"finish_reason", "stop"}}}}};
      res.set_content(out.dump(), "application/json");
    });
    port = svr.bind_to_any_port("127.0.0.1");
    REQUIRE(port > 0);
    thread = std::thread([this] { svr.listen_after_bind(); });
    for (int i = 0; i < 200 && !svr.is_running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    REQUIRE(svr.is_running());
  }
  ~StubJudgeServer() {
    svr.stop();
    thread.join();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port) + "/v1"; }
};

emt::JudgeOptions http_options(const StubJudgeServer& s, const std::string& cache = "") {
  emt::JudgeOptions o;
  o.url = s.url();
  o.model = "stub-judge-1";
  o.api_key_env = "EMT_TEST_JUDGE_KEY";
  o.timeout_s = 5;
  o.retries = 2;
  o.retry_delay_s = 0.01;
  o.cache = cache;
  return o;
}

const char* kKey = "sk-test-0123456789-secret";

}  // namespace

TEST_CASE("judge over HTTP: the request, the key from the environment, the verdicts", "[judge]") {
  StubJudgeServer s;
  ::setenv("EMT_TEST_JUDGE_KEY", kKey, 1);
  const std::string dir = emt_test::scratch_dir("judge_http");
  emt::Judge j(http_options(s, dir + "/cache.jsonl"));
  CHECK(j.says_yes("cat", "The object is a cat."));
  CHECK_FALSE(j.says_yes("cat", "The object is a dog."));
  CHECK(j.asked() == 2);
  REQUIRE(s.bodies.size() == 2);
  const auto& b = s.bodies[0];
  CHECK(b["model"] == "stub-judge-1");
  CHECK(b["temperature"] == 0);
  REQUIRE(b["messages"].size() == 1);
  CHECK(b["messages"][0]["role"] == "user");
  CHECK(b["messages"][0]["content"] == emt::judge_question("cat", "The object is a cat."));
  CHECK(s.auth[0] == std::string("Bearer ") + kKey);
  CHECK(j.describe() == "model stub-judge-1 at " + s.url());
  // The key is in no file the judge writes.
  const std::string cache = emt_test::slurp(dir + "/cache.jsonl");
  CHECK(cache.find("The object is a dog.") != std::string::npos);
  CHECK(cache.find(kKey) == std::string::npos);

  // No key in the environment: the request goes out without one.
  ::unsetenv("EMT_TEST_JUDGE_KEY");
  emt::Judge nokey(http_options(s));
  CHECK(nokey.says_yes("dog", "a dog"));
  CHECK(s.auth.back().empty());
}

TEST_CASE("judge over HTTP: the cache answers what was asked before, across processes' runs", "[judge]") {
  StubJudgeServer s;
  const std::string dir = emt_test::scratch_dir("judge_cache");
  const std::string cache = dir + "/judge_cache.jsonl";
  {
    emt::Judge j(http_options(s, cache));
    CHECK(j.says_yes("cat", "a cat"));
    CHECK(j.says_yes("cat", "a cat"));  // the same question within one run
    CHECK_FALSE(j.says_yes("bird", "a cat"));
    CHECK(j.asked() == 2);
    CHECK(j.cached() == 1);
  }
  CHECK(s.requests == 2);
  {
    emt::Judge again(http_options(s, cache));  // a later run reads the file
    CHECK(again.says_yes("cat", "a cat"));
    CHECK_FALSE(again.says_yes("bird", "a cat"));
    CHECK(again.asked() == 0);
    CHECK(again.cached() == 2);
  }
  CHECK(s.requests == 2);
  // Another model's answers are not this judge's.
  auto other = http_options(s, cache);
  other.model = "stub-judge-2";
  emt::Judge j2(other);
  CHECK(j2.says_yes("cat", "a cat"));
  CHECK(j2.asked() == 1);

  // A truncated last line (a killed run) is skipped; a corrupt line before it is an error naming file:line.
  emt_test::spit(cache, emt_test::slurp(cache) + "{\"judge\": \"model stub");
  CHECK_NOTHROW(emt::Judge(http_options(s, cache)));
  emt_test::spit(cache, "not json\n" + emt_test::slurp(cache));
  try {
    emt::Judge bad(http_options(s, cache));
    FAIL("a corrupt cache was accepted");
  } catch (const emt::FormatError& e) {
    CHECK(std::string(e.what()).find(cache + ":1") != std::string::npos);
  }
}

TEST_CASE("judge over HTTP: retries on 5xx and 429, then a clear error; no retry on 401", "[judge]") {
  StubJudgeServer s;
  s.fail_first = 2;  // two 503s, then an answer: within 2 retries
  emt::Judge j(http_options(s));
  CHECK(j.says_yes("cat", "a cat"));
  CHECK(s.requests == 3);
  CHECK(j.asked() == 3);

  s.requests = 0;
  s.fail_first = 10;
  s.fail_status = 429;
  emt::Judge j1(http_options(s));
  try {
    j1.says_yes("dog", "a dog");
    FAIL("a judge that never answers was accepted");
  } catch (const emt::Error& e) {
    const std::string what = e.what();
    CHECK(what.find("failed 3 time(s)") != std::string::npos);
    CHECK(what.find("HTTP 429") != std::string::npos);
    CHECK(what.find(s.url() + "/chat/completions") != std::string::npos);
  }
  CHECK(s.requests == 3);

  s.requests = 0;
  s.fail_status = 401;
  ::setenv("EMT_TEST_JUDGE_KEY", kKey, 1);
  emt::Judge j2(http_options(s));
  try {
    j2.says_yes("dog", "a dog");
    FAIL("a 401 was accepted");
  } catch (const emt::Error& e) {
    const std::string what = e.what();
    CHECK(what.find("HTTP 401") != std::string::npos);
    CHECK(what.find("not retried") != std::string::npos);
    CHECK(what.find(kKey) == std::string::npos);  // never the key
  }
  ::unsetenv("EMT_TEST_JUDGE_KEY");
  CHECK(s.requests == 1);
}

TEST_CASE("judge over HTTP: a timeout, a refused connection and replies without a verdict", "[judge]") {
  StubJudgeServer s;
  s.delay_ms = 1500;
  auto o = http_options(s);
  o.timeout_s = 0.2;
  o.retries = 1;
  emt::Judge slow(o);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(slow.says_yes("cat", "a cat"), Catch::Contains("failed 2 time(s)") && Catch::Contains("eval.judge_timeout_s"));
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(1400));  // did not wait for the reply
  s.delay_ms = 0;

  s.reply_override = R"({"choices": [{"message": {"role": "assistant", "content": "Perhaps."}}]})";
  emt::Judge vague(http_options(s));
  CHECK_THROWS_WITH(vague.says_yes("cat", "a cat"), Catch::Contains("'Perhaps.'") && Catch::Contains("yes or no"));
  s.reply_override = R"({"unexpected": true})";
  CHECK_THROWS_WITH(vague.says_yes("cat", "a cat"), Catch::Contains("choices[0].message.content"));

  // Nothing listens on the port any more.
  const std::string gone = s.url();
  s.svr.stop();
  s.thread.join();
  s.thread = std::thread([] {});
  auto g = http_options(s);
  g.retries = 0;
  emt::Judge nobody(g);
  CHECK_THROWS_WITH(nobody.says_yes("cat", "a cat"), Catch::Contains(gone));
}

TEST_CASE("judge options: validation names the key", "[judge]") {
  emt::JudgeOptions none;
  CHECK_THROWS_WITH(emt::Judge(none), Catch::Contains("eval.judge_url"));
  emt::JudgeOptions both;
  both.command = "echo yes";
  both.url = "http://127.0.0.1:1/v1";
  both.model = "m";
  CHECK_THROWS_AS(emt::Judge(both), emt::ConfigError);
  emt::JudgeOptions scheme;
  scheme.url = "file:///etc/passwd";
  scheme.model = "m";
  CHECK_THROWS_WITH(emt::Judge(scheme), Catch::Contains("http:// or https://"));
  emt::JudgeOptions nomodel;
  nomodel.url = "https://example.invalid/v1";
  CHECK_THROWS_WITH(emt::Judge(nomodel), Catch::Contains("eval.judge_model"));
  emt::JudgeOptions t;
  t.url = "https://example.invalid/v1";
  t.model = "m";
  t.timeout_s = 0;
  CHECK_THROWS_WITH(emt::Judge(t), Catch::Contains("eval.judge_timeout_s"));

  // The same rules where a config is read.
  CHECK_THROWS_WITH(emt::load_config_string("eval: {scorers: [strict, judge], judge_url: 'ftp://x', judge_model: m}\n"),
                    Catch::Contains("eval.judge_url"));
  CHECK_THROWS_WITH(emt::load_config_string("eval: {scorers: [strict, judge], judge_url: 'http://x'}\n"),
                    Catch::Contains("eval.judge_model"));
  auto cfg = emt::load_config_string(
      "run: {out_dir: /tmp/r, name: n}\neval: {scorers: [strict, judge], judge_url: 'http://x/v1', judge_model: m}\n");
  auto o = emt::judge_options(cfg);
  CHECK(o.url == "http://x/v1");
  CHECK(o.cache == "/tmp/r/n/judge_cache.jsonl");
  CHECK(o.api_key_env == "OPENAI_API_KEY");
}

TEST_CASE("a config's judge endpoint is contacted only when the process allows it", "[judge]") {
  StubJudgeServer s;
  emt::RunConfig cfg;
  cfg.eval.scorers = {"strict", "judge"};
  cfg.eval.judge_url = s.url();
  cfg.eval.judge_model = "stub-judge-1";
  emt::allow_config_judge(false);
  try {
    emt::check_config_judge(cfg);
    FAIL("a configured judge endpoint was accepted without --allow-judge");
  } catch (const emt::ConfigError& e) {
    const std::string what = e.what();
    CHECK(what.find("eval.judge_url") != std::string::npos);
    CHECK(what.find(s.url()) != std::string::npos);
    CHECK(what.find("--allow-judge") != std::string::npos);
  }
  CHECK(s.requests == 0);
  emt::allow_config_judge(true);
  CHECK_NOTHROW(emt::check_config_judge(cfg));
  emt::allow_config_judge(false);
}

TEST_CASE("emt eval --rescore with an HTTP judge: a second re-scoring asks nothing", "[judge]") {
  StubJudgeServer s;
  const std::string dir = emt_test::scratch_dir("judge_rescore");
  std::string lines;
  for (const auto& [label, name, out] : std::vector<std::tuple<int, std::string, std::string>>{
           {0, "cat", "The object is a cat."}, {1, "dog", "It looks like a cat."}, {2, "bird", "bird"}}) {
    nlohmann::ordered_json j = {{"finetune_dataset", ""}, {"method", "base"}, {"seed", 0}, {"epoch", 0},
                                {"dataset", "toy3"},       {"index", label},  {"label", label},
                                {"label_name", name},      {"output", out},   {"verdict_strict", "correct"}};
    lines += j.dump() + "\n";
  }
  std::filesystem::create_directories(dir + "/predictions/base/epoch_0");
  emt_test::spit(dir + "/predictions/base/epoch_0/toy3.jsonl", lines);
  emt_test::spit(dir + "/results.jsonl", "");
  const std::string args = "eval --rescore " + dir + " --judge-url " + s.url() + " --judge-model stub-judge-1 " +
                           "--judge-key-env EMT_TEST_JUDGE_KEY_CLI";
  auto r = emt_test::run_cli_env(std::string("EMT_TEST_JUDGE_KEY_CLI=") + kKey, args);
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("3 question(s) asked, 0 answered from the cache") != std::string::npos);
  CHECK(s.requests == 3);
  auto rows = emt::load_results({dir}).rows;
  bool judged = false;
  for (const auto& row : rows)
    if (row.scorer == "judge") {
      judged = true;
      CHECK(row.n == 3);
      CHECK(row.n_correct == 2);  // cat, bird
    }
  CHECK(judged);
  CHECK(std::filesystem::exists(dir + "/judge_cache.jsonl"));
  CHECK(emt_test::slurp(dir + "/judge_cache.jsonl").find(kKey) == std::string::npos);
  for (const auto& p : std::filesystem::recursive_directory_iterator(dir))
    if (p.is_regular_file()) CHECK(emt_test::slurp(p.path().string()).find(kKey) == std::string::npos);

  auto again = emt_test::run_cli_env(std::string("EMT_TEST_JUDGE_KEY_CLI=") + kKey, args);
  REQUIRE(again.code == 0);
  CHECK(again.output.find("0 question(s) asked, 3 answered from the cache") != std::string::npos);
  CHECK(s.requests == 3);
}
