// Internal: on-device verification of the open backend against the package's reference set
// (the contract of cxr_edge/verify.py: reference.u16 = (K, size, size) little-endian uint16,
// x = value / scale, model input = normalise(x); probabilities from torch fp32 in model.json).
#pragma once

#include <cstddef>
#include <filesystem>
#include <functional>
#include <string>

#include "package.hpp"

namespace cxr {

struct VerifyStats {
    std::size_t n = 0;
    double agreement = 0, lower_bound = 0, max_abs_dp = 0, p99_abs_dp = 0;
    bool passed = false;
    bool from_cache = false;
    std::string failures;  // "; "-joined, empty when passed
};

// Whether the export verdict carries over (formats.needs_device_verdict): not for bf16/fp16 or any GPU.
bool needs_device_verdict(const std::string& backend, const std::string& precision);

// Where native verdicts are cached: <cache_dir>/native-verdicts, cache_dir being the option when set,
// else $CXR_EDGE_CACHE, else $XDG_CACHE_HOME/cxr-edge, else ~/.cache/cxr-edge.
std::filesystem::path verdict_dir(const std::string& cache_dir_option);

// Runs `probs(tensors, n, out)` (n normalised inputs -> n x classes softmax probabilities) over the
// reference set and judges the result with the formats.TOLERANCES of `precision`. With a cache
// directory, a verdict for the same key (artifact and reference checksums, backend, precision,
// runtime description, device fingerprint) is reused; an unreadable entry is re-measured.
// Throws cxr::Error(CXR_E_UNAVAILABLE) when the package has no reference set, CXR_E_PACKAGE when
// model.json's record is malformed.
VerifyStats verify_on_device(const Package& pkg, const Artifact& artifact, const std::string& backend,
                             const std::string& precision, const std::string& runtime_description,
                             const std::function<void(const float*, std::size_t, float*)>& probs,
                             const std::filesystem::path& cache_dir);

}  // namespace cxr
