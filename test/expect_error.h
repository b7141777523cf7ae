// Test helper: runs a callable that must throw exception type E and returns its message (fails the test otherwise).
#pragma once
#include <catch2/catch.hpp>
#include <exception>
#include <functional>
#include <string>

namespace emt_test {

template <typename E>
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("wrong exception type: " << e.what());
  }
  FAIL("no exception thrown");
  return {};
}

}  // namespace emt_test
