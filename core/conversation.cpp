// Conversation templates (plain, vicuna_v1, llava_v1, llava_v0) rendered the way LLaVA's get_prompt does.
#include <emt/core/conversation.h>
#include <emt/core/error.h>
#include <emt/core/tokenizer.h>

#include <fmt/format.h>

namespace emt {

namespace {

const std::vector<ConversationTemplate>& templates() {
  static const std::vector<ConversationTemplate> t = {
      {"plain", "", "", "", "\n", "</s>"},
      // LLaVA-1.5's "v1"/"vicuna_v1" mode (conv_vicuna_v1).
      {"vicuna_v1",
       "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the user's questions.",
       "USER", "ASSISTANT", " ", "</s>"},
      // LLaVA's "llava_v1" mode: the same format with the "curious human" system text.
      {"llava_v1",
       "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the human's questions.",
       "USER", "ASSISTANT", " ", "</s>"},
      // The original LLaVA "###" format (conv_llava_v0, SeparatorStyle.SINGLE).
      {"llava_v0",
       "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the human's questions.",
       "Human", "Assistant", "###", "###"},
  };
  return t;
}

}  // namespace

std::vector<std::string> conversation_names() {
  std::vector<std::string> n;
  for (auto& t : templates()) n.push_back(t.name);
  return n;
}

const ConversationTemplate& conversation_template(const std::string& name) {
  for (auto& t : templates())
    if (t.name == name) return t;
  std::string list;
  for (auto& n : conversation_names()) list += (list.empty() ? "" : ", ") + n;
  throw ConfigError(fmt::format("[conversation] unknown template '{}' (known: {})", name, list));
}

std::string render_prompt(const std::string& template_name, const std::string& system, const std::string& question) {
  const ConversationTemplate& t = conversation_template(template_name);
  const std::string q = question.find("<image>") != std::string::npos ? question : "<image>\n" + question;
  if (t.name == "plain") return q + t.sep;
  const std::string sys = system.empty() ? t.system : system;
  return sys + t.sep + t.user_role + ": " + q + t.sep + t.assistant_role + ":";
}

std::string answer_suffix(const std::string& template_name) { return conversation_template(template_name).answer_sep; }

std::vector<int64_t> encode_answer(const Tokenizer& tok, const std::string& template_name, const std::string& answer) {
  const std::string suffix = answer_suffix(template_name);
  if (suffix == "</s>") {
    auto ids = tok.encode(answer, /*add_bos=*/false);
    ids.push_back(tok.eos_id());
    return ids;
  }
  return tok.encode(answer + suffix, /*add_bos=*/false);
}

std::vector<std::string> stop_strings(const std::string& template_name) {
  const ConversationTemplate& t = conversation_template(template_name);
  if (t.answer_sep == "###") return {"###"};
  return {"</s>"};
}

}  // namespace emt
