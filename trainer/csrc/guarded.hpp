// What weft's C++ shims share: every extern "C" entry point runs its body
// through `guarded`, which catches every C++ exception and returns its
// message through `err` (strdup'd; Rust frees it with
// weft_c10d_free_string) with a non-zero return code. Nothing throws across
// the C boundary.

#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace weft_shim {

inline int fail(char** err, const std::string& message) {
  if (err != nullptr) {
    *err = strdup(message.c_str());
  }
  return 1;
}

template <typename F>
int guarded(char** err, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    return fail(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    return fail(err, e.what());
  } catch (...) {
    return fail(err, "unknown C++ exception");
  }
}

}  // namespace weft_shim
