// Internal: a model package as described by its model.json (cxr_edge/package.py is the reference).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "preprocess.hpp"

namespace cxr {

// A file model.json lists with its checksum (an artifact's companion, the reference set).
struct FileRecord {
    std::string file;
    std::string sha256;
    std::int64_t bytes = 0;
};

struct Artifact {
    std::string file;
    std::string format;     // "onnx", "onnx-qdq", "openvino-ir", "safetensors"
    std::string precision;  // weights precision of the file: "fp32", "int8"
    std::string sha256;     // as recorded in model.json, verified against the file by read_package
    std::int64_t bytes = 0;
    std::vector<std::string> outputs;
    std::vector<FileRecord> companions;  // files read with `file` (the OpenVINO IR .bin), verified too
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
    FileRecord reference_set;  // file empty when model.json has none

    // First artifact with this weights precision and format, as ModelPackage.artifact does.
    const Artifact* artifact(const std::string& precision, const std::string& format) const;
    std::filesystem::path path(const Artifact& a) const { return root / a.file; }
};

// Reads and validates <dir>/model.json with the rules of ModelPackage.read (cxr_edge/package.py and
// the JSON Schema cxr_edge/schema/model.schema.json): nesting at most 64 deep, finite mean/std;
// every listed file (artifacts, their companions, the reference set) a regular file inside the
// package whose size matches (checked before reading) and whose SHA-256 (OpenSSL libcrypto) matches;
// ONNX files without external data; no unlisted weights-like file in the package.
// Throws cxr::Error(CXR_E_PACKAGE, ...) on any problem.
Package read_package(const std::filesystem::path& dir);

// model.json's "preprocess" object -> spec, with PreprocessSpec.__post_init__'s checks.
// Throws cxr::Error(CXR_E_PACKAGE, ...).
PreprocessSpec parse_preprocess_spec(const std::string& json_text);

// Lowercase hex SHA-256 of a file's bytes (OpenSSL EVP). Throws cxr::Error(CXR_E_PACKAGE, ...).
std::string sha256_file(const std::filesystem::path& path);

}  // namespace cxr
