// Internal: inference backends. A backend sees only ready (N, C, H, W) float32 tensors and returns
// logits; preprocessing, softmax and artifact choice happen once, in cxr_edge.cpp, for all of them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "package.hpp"

namespace cxr {

struct Options {
    std::string backend = "auto";
    std::string precision = "auto";
    std::string device = "CPU";
    int num_threads = 0;
    std::uint32_t flags = 0;
    std::string cache_dir;
};

class Backend {
public:
    virtual ~Backend() = default;
    // input: n * C * H * W floats; logits: n * num_classes floats. Safe to call concurrently.
    // Throws cxr::Error(CXR_E_BACKEND) when the runtime fails.
    virtual void infer(const float* input, std::size_t n, float* logits) = 0;
    // What the runtime says it computes in (e.g. "f32"), for logs and CXR_PROP_INFERENCE_PRECISION.
    virtual std::string inference_precision() const = 0;
    virtual std::string device() const = 0;
};

// Whether OpenVINO can run `precision` on the device; when not, *why says so.
bool openvino_supports(const std::string& precision, const Options& options, std::string* why);

// "openvino <build number>": part of the native verdict cache key (verify.hpp).
std::string openvino_runtime_version();

// Compiles the artifact with OpenVINO at `precision` (fp32/bf16/fp16 set as the inference precision
// hint, explicitly: the CPU plugin would otherwise pick bf16 by itself on AMX/AVX512-BF16 CPUs).
// Throws cxr::Error(CXR_E_BACKEND or CXR_E_PACKAGE).
std::unique_ptr<Backend> open_openvino(const Package& pkg, const Artifact& artifact, const std::string& precision,
                                       const Options& options);

#ifdef CXR_EDGE_HAVE_TENSORRT
// Empty when a CUDA GPU and TensorRT >= 10 are usable, else why not.
std::string tensorrt_unavailable_reason();
// "tensorrt <getInferLibVersion()>": part of the native verdict cache key.
std::string tensorrt_runtime_version();
std::unique_ptr<Backend> open_tensorrt(const Package& pkg, const Artifact& artifact, const std::string& precision,
                                       const Options& options);
#endif

}  // namespace cxr
