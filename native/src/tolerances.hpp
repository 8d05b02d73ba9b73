// Internal: parity tolerances for on-device verification (cxr_verify). The same table as
// cxr_edge/formats.py TOLERANCES — tests/test_verify.py::test_native_sdk_tables_match_formats fails
// when the two differ. Fields: min top-1 agreement (point estimate), min Wilson 95 % lower bound of
// agreement (0: none), max |dp| over all images and classes (1: none). Labelled-set criteria
// (accuracy / recall drops) do not apply to the reference set and are not here.
#pragma once

#include <cstring>

namespace cxr {

struct Tolerance {
    const char* precision;
    double min_agreement;
    double min_lower_bound;
    double max_abs_dp;
};

inline constexpr Tolerance kTolerances[] = {
    {"fp32", 1.0, 0.0, 0.0001},
    {"fp16", 0.0, 0.97, 0.02},
    {"bf16", 0.0, 0.97, 0.03},
    {"int8", 0.0, 0.95, 0.3},
};

inline const Tolerance* tolerance_for(const char* precision) {
    for (const auto& t : kTolerances)
        if (std::strcmp(t.precision, precision) == 0) return &t;
    return nullptr;
}

}  // namespace cxr
