// Internal to the library: small string helpers shared by several translation units (one definition each, so the
// sources can be compiled together in unity batches).
#pragma once
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>
#include <vector>

namespace emt::detail {

// `s` without leading and trailing spaces, tabs, CR and LF.
inline std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r\n");
  if (a == std::string::npos) return "";
  size_t b = s.find_last_not_of(" \t\r\n");
  return s.substr(a, b - a + 1);
}

inline std::string join(const std::vector<std::string>& v, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

// "[2, 3, 4]"
inline std::string shape_str(c10::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Dotted module paths. `path` names `name` itself or ends in ".name".
inline bool ends_with_component(const std::string& path, const std::string& name) {
  return path == name || (path.size() > name.size() + 1 &&
                          path.compare(path.size() - name.size(), name.size(), name) == 0 &&
                          path[path.size() - name.size() - 1] == '.');
}

// `path` lies strictly inside `root` ("root.x..."), not `root` itself.
inline bool strictly_under(const std::string& path, const std::string& root) {
  return path.size() > root.size() && path.compare(0, root.size(), root) == 0 && path[root.size()] == '.';
}

}  // namespace emt::detail
