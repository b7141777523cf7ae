// Entry point of the [gpu] tests: exits with 77 (CTest's "skipped") and says why when LibTorch sees no CUDA
// device, so a CPU machine reports them as skipped, never as passed.
#define CATCH_CONFIG_RUNNER
#include <torch/cuda.h>
#include <torch/version.h>

#include <catch2/catch.hpp>
#include <cstdio>

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::printf("SKIPPED: no CUDA device visible to LibTorch %s; the [gpu] tests need one\n", TORCH_VERSION);
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
