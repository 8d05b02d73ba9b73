// Internal: a model package as described by its model.json (cxr_edge/package.py is the reference).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "preprocess.hpp"

namespace cxr {

struct Artifact {
    std::string file;
    std::string format;     // "onnx", "onnx-qdq", "openvino-ir"
    std::string precision;  // weights precision of the file: "fp32", "int8"
    std::string sha256;     // as recorded in model.json (not recomputed here)
    std::int64_t bytes = 0;
    std::vector<std::string> outputs;
    std::map<std::string, bool> gate_passed;  // "<backend>/<run precision>" -> passed

    bool passed_for(const std::string& backend, const std::string& run_precision) const;
};

struct Package {
    std::filesystem::path root;
    std::string name;
    std::vector<std::string> classes;
    std::string normal_class;  // empty when model.json has none
    PreprocessSpec preprocess;
    std::vector<Artifact> artifacts;

    // First artifact with this weights precision and format, as ModelPackage.artifact does.
    const Artifact* artifact(const std::string& precision, const std::string& format) const;
    std::filesystem::path path(const Artifact& a) const { return root / a.file; }
};

// Reads and validates <dir>/model.json with the rules of ModelPackage.read. Every listed artifact
// must exist with the size recorded in model.json; SHA-256 checksums are not recomputed.
// Throws cxr::Error(CXR_E_PACKAGE, ...) on any problem.
Package read_package(const std::filesystem::path& dir);

// model.json's "preprocess" object -> spec, with PreprocessSpec.__post_init__'s checks.
// Throws cxr::Error(CXR_E_PACKAGE, ...).
PreprocessSpec parse_preprocess_spec(const std::string& json_text);

}  // namespace cxr
