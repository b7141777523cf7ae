// Conversation templates that wrap a question into the text a model was trained on. Every rendered prompt holds
// the literal "<image>" placeholder exactly once; the tokenizer maps it to one special id that the model expands
// into the image's patch embeddings.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace emt {

// The formats follow LLaVA's conversation.py (get_prompt):
//   plain     : "<image>\n{question}\n"                              answer + eos
//   vicuna_v1 : "{system} USER: <image>\n{question} ASSISTANT:"      " " answer "</s>"   (sep " ", sep2 "</s>")
//   llava_v1  : same as vicuna_v1 with LLaVA's "curious human" system text
//   llava_v0  : "{system}###Human: <image>\n{question}###Assistant:" " " answer "###"    (sep "###")
struct ConversationTemplate {
  std::string name;
  std::string system;            // default system text ("" for plain)
  std::string user_role;         // "USER", "Human", "" (plain)
  std::string assistant_role;    // "ASSISTANT", "Assistant", ""
  std::string sep;               // after the system text and after each user turn
  std::string answer_sep;        // what ends an assistant turn ("</s>" = the eos token)
};

const ConversationTemplate& conversation_template(const std::string& name);  // ConfigError listing known names
std::vector<std::string> conversation_names();

// Text up to and including the assistant cue. `system` empty = the template's default. If `question` already
// contains "<image>" it is kept where it is; otherwise "<image>\n" is put in front of the question.
std::string render_prompt(const std::string& template_name, const std::string& system, const std::string& question);
// What ends an answer in training: "</s>" (the loader appends the eos id) or "###" (llava_v0, appended as text).
std::string answer_suffix(const std::string& template_name);
class Tokenizer;
// The ids of an answer as a training target and as a likelihood candidate: the answer, then EOS (templates
// ending turns with "</s>") or the template's text suffix. Not thread-safe on its own: callers sharing a
// tokenizer across threads serialise calls.
std::vector<int64_t> encode_answer(const Tokenizer& tok, const std::string& template_name, const std::string& answer);
// Text that ends a generated answer (the evaluator cuts there).
std::vector<std::string> stop_strings(const std::string& template_name);

}  // namespace emt
