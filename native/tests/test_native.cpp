// Native SDK tests against vectors made by the Python runtime (make_vectors.py).
//
//   cxr_edge_tests preprocess VECTORS          C++ tensors vs cxr_edge.preprocess, every spec, 1e-5
//   cxr_edge_tests classify VECTORS [PREC]     C API tensors and probabilities vs Python, 1e-4
//   cxr_edge_tests threads VECTORS             one model shared by several threads
//   cxr_edge_tests errors VECTORS SCRATCH      bad arguments and broken packages -> status codes
//
// Each prints what it measured and exits non-zero on any failure.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "cxr_edge.h"
#include "preprocess.hpp"
#include "package.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr double kTensorTol = 1e-5;  // the target for preprocessing parity
constexpr double kProbTol = 1e-4;    // formats.TOLERANCES["fp32"].max_abs_dp

int g_failures = 0;

void fail(const std::string& what) {
    ++g_failures;
    std::cout << "FAIL: " << what << "\n";
}

std::vector<unsigned char> read_bytes(const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + p.string());
    return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

std::vector<float> read_f32(const fs::path& p) {
    auto b = read_bytes(p);
    std::vector<float> v(b.size() / 4);
    std::memcpy(v.data(), b.data(), v.size() * 4);  // little-endian files on a little-endian host
    return v;
}

void write_text(const fs::path& p, const std::string& s) {
    std::ofstream f(p, std::ios::binary);
    f << s;
}

struct Case {
    std::string name;
    std::vector<unsigned char> raw;
    cxr_image image{};
    json tensors;
    std::vector<double> probs;  // fp32 probabilities from Python, when recorded
};

struct Vectors {
    fs::path dir;
    json manifest;
    std::vector<Case> cases;
    std::vector<std::string> classes;
    std::string package;
};

Vectors load(const fs::path& dir, const std::string& precision = "fp32") {
    Vectors v;
    v.dir = dir;
    v.manifest = json::parse(read_bytes(dir / "vectors.json"));
    v.classes = v.manifest["classes"].get<std::vector<std::string>>();
    v.package = v.manifest["package"].get<std::string>();
    const json& probs = v.manifest["probabilities"];
    std::size_t i = 0;
    for (const auto& c : v.manifest["cases"]) {
        Case k;
        k.name = c["name"];
        k.raw = read_bytes(dir / c["raw"].get<std::string>());
        k.tensors = c["tensors"];
        if (probs.contains(precision)) k.probs = probs[precision][i].get<std::vector<double>>();
        ++i;
        v.cases.push_back(std::move(k));
    }
    // Pointers into raw are taken only once the vector has stopped moving.
    i = 0;
    for (const auto& c : v.manifest["cases"]) {
        Case& k = v.cases[i++];
        k.image.pixels = k.raw.data();
        k.image.width = c["width"];
        k.image.height = c["height"];
        k.image.row_stride = c["stride"];
        k.image.pixel_type = c["type"] == "u16" ? CXR_PIXEL_U16 : CXR_PIXEL_U8;
        k.image.bits_stored = k.image.pixel_type == CXR_PIXEL_U16 ? c["bits"].get<uint32_t>() : 0;
        k.image.monochrome1 = c["monochrome1"].get<bool>() ? 1 : 0;
    }
    return v;
}

double max_abs_diff(const float* a, const float* b, std::size_t n) {
    double m = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
        if (!(d <= m)) m = d;  // NaN propagates as a failure
    }
    return m;
}

cxr_model* open_or_die(const std::string& pkg, const char* precision, uint32_t flags = 0) {
    cxr_options o;
    cxr_options_init(&o);
    o.precision = precision;
    o.backend = "openvino";
    o.flags = flags;
    cxr_model* m = nullptr;
    const cxr_status st = cxr_open(pkg.c_str(), &o, &m);
    if (st != CXR_OK || !m) {
        std::cout << "FAIL: cannot open " << pkg << ": " << cxr_status_name(st) << " " << cxr_last_error() << "\n";
        std::exit(1);
    }
    return m;
}

// -- preprocess --------------------------------------------------------------------------------------
int test_preprocess(const fs::path& dir) {
    Vectors v = load(dir);
    double worst = 0;
    std::size_t compared = 0;
    for (auto it = v.manifest["specs"].begin(); it != v.manifest["specs"].end(); ++it) {
        const cxr::PreprocessSpec spec = cxr::parse_preprocess_spec(it.value().dump());
        double worst_spec = 0;
        std::vector<float> got(spec.tensor_size());
        for (const Case& c : v.cases) {
            const auto want = read_f32(dir / c.tensors[it.key()].get<std::string>());
            if (want.size() != got.size()) {
                fail(c.name + " " + it.key() + ": expected tensor has " + std::to_string(want.size()) + " floats, spec says " +
                     std::to_string(got.size()));
                continue;
            }
            std::fill(got.begin(), got.end(), std::nanf(""));
            cxr::preprocess(c.image, spec, got.data());
            const double d = max_abs_diff(got.data(), want.data(), got.size());
            worst_spec = std::max(worst_spec, d);
            ++compared;
            if (!(d <= kTensorTol)) fail(c.name + " " + it.key() + ": max |dtensor| " + std::to_string(d));
        }
        std::printf("spec %-20s max |dtensor| %.3g over %zu images\n", it.key().c_str(), worst_spec, v.cases.size());
        worst = std::max(worst, worst_spec);
    }
    std::printf("preprocess: %zu tensors, max |dtensor| vs Python %.3g (tolerance %.0e)\n", compared, worst, kTensorTol);
    if (compared == 0) fail("no tensors compared");
    return g_failures ? 1 : 0;
}

// -- classify ---------------------------------------------------------------------------------------
int test_classify(const fs::path& dir, const std::string& precision) {
    Vectors v = load(dir, precision);
    if (!v.manifest["probabilities"].contains(precision)) {
        fail("vectors have no " + precision + " probabilities (see make_vectors.py output)");
        return 1;
    }
    cxr_model* m = open_or_die(v.package, precision.c_str());
    const char* desc = "";
    cxr_get_property(m, CXR_PROP_DESCRIPTION, &desc);
    std::printf("model: %s\n", desc);

    size_t k = 0;
    if (cxr_num_classes(m, &k) != CXR_OK || k != v.classes.size()) fail("num_classes differs from model.json");
    for (size_t i = 0; i < k; ++i) {
        const char* name = nullptr;
        if (cxr_class_name(m, i, &name) != CXR_OK || v.classes[i] != name) fail("class " + std::to_string(i) + " name");
    }
    const char* prop = nullptr;
    if (cxr_get_property(m, CXR_PROP_PRECISION, &prop) != CXR_OK || precision != prop) fail("precision property");
    if (cxr_get_property(m, CXR_PROP_BACKEND, &prop) != CXR_OK || std::string("openvino") != prop) fail("backend property");
    if (precision == "fp32" && (cxr_get_property(m, CXR_PROP_INFERENCE_PRECISION, &prop) != CXR_OK ||
                                std::string("f32") != prop))
        fail(std::string("fp32 must run with inference precision f32, got ") + (prop ? prop : "?"));

    // The tensor the C API feeds the network equals Python's for the package's spec.
    uint32_t ch = 0, h = 0, w = 0;
    cxr_input_shape(m, &ch, &h, &w);
    std::vector<float> tensor(static_cast<std::size_t>(ch) * h * w);
    double worst_t = 0;
    for (const Case& c : v.cases) {
        if (cxr_preprocess(m, &c.image, tensor.data(), tensor.size()) != CXR_OK) {
            fail(c.name + ": cxr_preprocess: " + cxr_last_error());
            continue;
        }
        const auto want = read_f32(dir / c.tensors["package"].get<std::string>());
        const double d = want.size() == tensor.size() ? max_abs_diff(tensor.data(), want.data(), want.size()) : INFINITY;
        worst_t = std::max(worst_t, d);
        if (!(d <= kTensorTol)) fail(c.name + ": cxr_preprocess max |dtensor| " + std::to_string(d));
    }

    // One at a time, then all in one batch call (several internal batches, padded strides mixed).
    std::vector<float> p(k);
    double worst_single = 0, worst_batch = 0;
    std::size_t agree = 0;
    for (const Case& c : v.cases) {
        std::fill(p.begin(), p.end(), std::nanf(""));
        if (cxr_classify(m, &c.image, p.data(), p.size()) != CXR_OK) {
            fail(c.name + ": cxr_classify: " + cxr_last_error());
            continue;
        }
        double d = 0, sum = 0;
        for (size_t j = 0; j < k; ++j) {
            d = std::max(d, std::fabs(p[j] - c.probs[j]));
            sum += p[j];
        }
        worst_single = std::max(worst_single, d);
        if (!(d <= kProbTol)) fail(c.name + ": max |dp| " + std::to_string(d));
        if (std::fabs(sum - 1.0) > 1e-5) fail(c.name + ": probabilities sum to " + std::to_string(sum));
        const auto top = [&](auto first, auto last) { return std::max_element(first, last) - first; };
        agree += top(p.begin(), p.end()) == top(c.probs.begin(), c.probs.end());
    }
    std::vector<cxr_image> images;
    for (const Case& c : v.cases) images.push_back(c.image);
    std::vector<float> all(images.size() * k, std::nanf(""));
    if (cxr_classify_batch(m, images.data(), images.size(), all.data(), all.size()) != CXR_OK) {
        fail(std::string("cxr_classify_batch: ") + cxr_last_error());
    } else {
        for (std::size_t i = 0; i < images.size(); ++i)
            for (size_t j = 0; j < k; ++j)
                worst_batch = std::max(worst_batch, std::fabs(static_cast<double>(all[i * k + j]) - v.cases[i].probs[j]));
        if (!(worst_batch <= kProbTol)) fail("batch: max |dp| " + std::to_string(worst_batch));
    }
    cxr_close(m);
    std::printf("classify %s: %zu images, max |dtensor| %.3g, max |dp| single %.3g, batch %.3g (tolerance %.0e), "
                "top-1 agreement %zu/%zu\n",
                precision.c_str(), v.cases.size(), worst_t, worst_single, worst_batch, kProbTol, agree, v.cases.size());
    return g_failures ? 1 : 0;
}

// -- threads ----------------------------------------------------------------------------------------
int test_threads(const fs::path& dir) {
    Vectors v = load(dir);
    cxr_model* m = open_or_die(v.package, "fp32");
    size_t k = 0;
    cxr_num_classes(m, &k);
    constexpr int kThreads = 4;
    std::atomic<int> bad{0};
    std::vector<std::string> errors(kThreads);
    std::vector<double> worst(kThreads, 0.0);
    std::vector<std::thread> pool;
    for (int t = 0; t < kThreads; ++t) {
        pool.emplace_back([&, t] {
            std::vector<float> p(k);
            // Each thread walks the cases from a different start, so different images overlap in time.
            for (std::size_t n = 0; n < v.cases.size(); ++n) {
                const Case& c = v.cases[(n * 7 + t * 5) % v.cases.size()];
                if (cxr_classify(m, &c.image, p.data(), p.size()) != CXR_OK) {
                    errors[t] = c.name + ": " + cxr_last_error();
                    ++bad;
                    return;
                }
                for (size_t j = 0; j < k; ++j) worst[t] = std::max(worst[t], std::fabs(p[j] - c.probs[j]));
                // A failing call on this thread leaves other threads' error text alone.
                if (n == 3 && cxr_classify(m, nullptr, p.data(), p.size()) != CXR_E_INVALID_ARGUMENT) ++bad;
            }
        });
    }
    for (auto& th : pool) th.join();
    cxr_close(m);
    const double w = *std::max_element(worst.begin(), worst.end());
    for (const auto& e : errors)
        if (!e.empty()) fail("thread: " + e);
    if (bad) fail(std::to_string(bad.load()) + " failed calls across threads");
    if (!(w <= kProbTol)) fail("threads: max |dp| " + std::to_string(w));
    std::printf("threads: %d threads x %zu images on one model, max |dp| vs Python %.3g\n", kThreads, v.cases.size(), w);
    return g_failures ? 1 : 0;
}

// -- errors -----------------------------------------------------------------------------------------
void expect(cxr_status got, cxr_status want, const std::string& what, const char* must_mention = nullptr) {
    const std::string msg = cxr_last_error();
    if (got != want) {
        fail(what + ": got " + cxr_status_name(got) + " (" + msg + "), expected " + cxr_status_name(want));
    } else if (want != CXR_OK && msg.empty()) {
        fail(what + ": failed without an error message");
    } else if (want == CXR_OK && !msg.empty()) {
        fail(what + ": succeeded but cxr_last_error() is '" + msg + "'");
    } else if (must_mention && msg.find(must_mention) == std::string::npos) {
        fail(what + ": message '" + msg + "' does not mention '" + must_mention + "'");
    } else {
        std::printf("ok   %-52s %s%s%s\n", what.c_str(), cxr_status_name(got), msg.empty() ? "" : ": ", msg.substr(0, 110).c_str());
    }
}

cxr_status try_open(const fs::path& dir, const char* precision = "fp32", uint32_t flags = 0, const char* backend = "auto") {
    cxr_options o;
    cxr_options_init(&o);
    o.precision = precision;
    o.backend = backend;
    o.flags = flags;
    cxr_model* m = reinterpret_cast<cxr_model*>(0x1);  // must be reset to NULL on failure
    const cxr_status st = cxr_open(dir.string().c_str(), &o, &m);
    if (st != CXR_OK && m != nullptr) fail(dir.string() + ": failed open left *out_model non-NULL");
    cxr_close(st == CXR_OK ? m : nullptr);
    return st;
}

int test_errors(const fs::path& dir, const fs::path& scratch) {
    Vectors v = load(dir);
    fs::remove_all(scratch);
    fs::create_directories(scratch);
    const fs::path pkg = v.package;
    const json meta = json::parse(read_bytes(pkg / "model.json"));
    // A package variant: model.json edited by `edit`, artifacts hard-linked to the real files (a
    // symlink leaving the package is refused), copied where a hard link is not possible.
    auto place = [](const fs::path& from, const fs::path& to) {
        std::error_code ec;
        fs::create_hard_link(from, to, ec);
        if (ec) fs::copy_file(from, to);
    };
    auto variant = [&](const std::string& name, const std::function<void(json&)>& edit) {
        const fs::path d = scratch / name;
        fs::create_directories(d);
        for (const auto& a : meta["artifacts"]) {
            place(pkg / a["file"].get<std::string>(), d / a["file"].get<std::string>());
            for (const auto& c : a.value("companions", json::array())) place(pkg / c["file"].get<std::string>(), d / c["file"].get<std::string>());
        }
        if (meta.contains("reference_set") && meta["reference_set"].is_object())
            place(pkg / meta["reference_set"]["file"].get<std::string>(), d / meta["reference_set"]["file"].get<std::string>());
        json m = meta;
        edit(m);
        write_text(d / "model.json", m.dump(1));
        return d;
    };
    const std::string onnx = meta["artifacts"][0]["file"];

    // cxr_open arguments
    cxr_model* m = nullptr;
    expect(cxr_open(nullptr, nullptr, &m), CXR_E_INVALID_ARGUMENT, "open: NULL package_dir");
    expect(cxr_open(pkg.string().c_str(), nullptr, nullptr), CXR_E_INVALID_ARGUMENT, "open: NULL out_model");
    expect(cxr_open("", nullptr, &m), CXR_E_INVALID_ARGUMENT, "open: empty package_dir");
    cxr_options o;
    std::memset(&o, 0, sizeof o);
    expect(cxr_open(pkg.string().c_str(), &o, &m), CXR_E_INVALID_ARGUMENT, "open: uninitialised options", "struct_size");
    cxr_options_init(&o);
    o.flags = 0x80;
    expect(cxr_open(pkg.string().c_str(), &o, &m), CXR_E_INVALID_ARGUMENT, "open: unknown flag bits");
    cxr_options_init(&o);
    o.num_threads = -2;
    expect(cxr_open(pkg.string().c_str(), &o, &m), CXR_E_INVALID_ARGUMENT, "open: negative num_threads");
    expect(try_open(pkg, "fp64"), CXR_E_INVALID_ARGUMENT, "open: unknown precision", "fp64");
    expect(try_open(pkg, "fp32", 0, "cuda"), CXR_E_INVALID_ARGUMENT, "open: unknown backend", "cuda");

    // packages
    expect(try_open(scratch / "no-such-dir"), CXR_E_PACKAGE, "package: directory missing", "not found");
    fs::create_directories(scratch / "empty");
    expect(try_open(scratch / "empty"), CXR_E_PACKAGE, "package: no model.json", "model.json");
    const fs::path corrupt = variant("corrupt-json", [](json&) {});
    write_text(corrupt / "model.json", meta.dump().substr(0, meta.dump().size() / 2));
    expect(try_open(corrupt), CXR_E_PACKAGE, "package: truncated model.json", "not valid JSON");
    write_text(corrupt / "model.json", "[1, 2]");
    expect(try_open(corrupt), CXR_E_PACKAGE, "package: model.json is a list", "top level");
    write_text(corrupt / "model.json", "");
    expect(try_open(corrupt), CXR_E_PACKAGE, "package: empty model.json", "not valid JSON");
    expect(try_open(variant("schema2", [](json& j) { j["schema_version"] = 2; })), CXR_E_PACKAGE,
           "package: newer schema_version", "newer");
    expect(try_open(variant("no-schema", [](json& j) { j.erase("schema_version"); })), CXR_E_PACKAGE,
           "package: schema_version missing", "schema_version");
    expect(try_open(variant("dup-classes", [](json& j) { j["classes"] = {"a", "a", "b"}; })), CXR_E_PACKAGE,
           "package: duplicate classes", "distinct");
    expect(try_open(variant("one-class", [](json& j) { j["classes"] = {"a"}; j["normal_class"] = nullptr; })),
           CXR_E_PACKAGE, "package: one class", "2+");
    expect(try_open(variant("bad-normal", [](json& j) { j["normal_class"] = "healthy"; })), CXR_E_PACKAGE,
           "package: normal_class not a class", "normal_class");
    expect(try_open(variant("unknown-key", [](json& j) { j["preprocess"]["gamma"] = 2.2; })), CXR_E_PACKAGE,
           "package: unknown preprocess key", "gamma");
    expect(try_open(variant("bad-resize", [](json& j) { j["preprocess"]["resize"] = "letterbox"; })), CXR_E_PACKAGE,
           "package: unknown resize policy", "letterbox");
    expect(try_open(variant("bad-std", [](json& j) { j["preprocess"]["std"][0] = 0.0; })), CXR_E_PACKAGE,
           "package: zero std", "std");
    expect(try_open(variant("mean-len", [](json& j) { j["preprocess"]["mean"] = {0.5}; })), CXR_E_PACKAGE,
           "package: mean length != channels", "mean/std");
    expect(try_open(variant("escape", [&](json& j) { j["artifacts"][0]["file"] = "../" + onnx; })), CXR_E_PACKAGE,
           "package: artifact path escapes the package", "plain name");
    const fs::path missing = variant("missing-artifact", [](json&) {});
    fs::remove(missing / onnx);
    expect(try_open(missing), CXR_E_PACKAGE, "package: artifact file missing", "missing");
    expect(try_open(variant("size-mismatch", [](json& j) { j["artifacts"][0]["bytes"] = j["artifacts"][0]["bytes"].get<long long>() + 1; })),
           CXR_E_PACKAGE, "package: artifact size differs from model.json", "corrupted");
    expect(try_open(variant("bad-artifact-key", [](json& j) { j["artifacts"][0]["colour"] = "red"; })), CXR_E_PACKAGE,
           "package: unknown artifact key", "colour");
    expect(try_open(variant("four-classes", [](json& j) { j["classes"].push_back("other"); })), CXR_E_PACKAGE,
           "package: model has fewer logits than classes", "classes");

    // gates and precisions
    const fs::path gate_failed = variant("gate-failed", [](json& j) {
        for (auto& a : j["artifacts"]) a["gate"]["openvino/fp32"] = {{"passed", false}};
    });
    expect(try_open(gate_failed), CXR_E_UNAVAILABLE, "gate: fp32 artifact failed its gate", "gate");
    expect(try_open(gate_failed, "fp32", CXR_FLAG_IGNORE_GATE), CXR_OK, "gate: ... opened with CXR_FLAG_IGNORE_GATE");
    const fs::path no_gate = variant("no-gate", [](json& j) {
        for (auto& a : j["artifacts"]) a.erase("gate");
    });
    expect(try_open(no_gate, "auto"), CXR_E_UNAVAILABLE, "gate: no gate records, precision auto", "gate");
    bool has_int8 = false;
    for (const auto& a : meta["artifacts"]) has_int8 |= a["precision"] == "int8";
    if (!has_int8) expect(try_open(pkg, "int8"), CXR_E_UNAVAILABLE, "precision: int8 without model.int8.onnx", "int8");
    expect(try_open(pkg, "fp32", 0, "tensorrt"), CXR_E_UNAVAILABLE, "backend: tensorrt unusable here", "tensorrt");
    {
        const cxr_status st = try_open(pkg, "bf16");
        if (st != CXR_OK && st != CXR_E_UNAVAILABLE) fail(std::string("bf16: ") + cxr_status_name(st) + " " + cxr_last_error());
        std::printf("ok   %-52s %s%s%s\n", "precision: bf16 (supported or refused)", cxr_status_name(st),
                    st == CXR_OK ? "" : ": ", cxr_last_error());
    }
    const fs::path garbage = variant("garbage-onnx", [](json&) {});
    fs::remove(garbage / onnx);
    write_text(garbage / onnx, std::string(static_cast<std::size_t>(meta["artifacts"][0]["bytes"].get<long long>()), '\x7f'));
    expect(try_open(garbage), CXR_E_PACKAGE, "package: same-size artifact, other bytes", "checksum mismatch");
    {   // the same garbage with its checksum recorded: the package is consistent, the backend refuses it
        json g = json::parse(read_bytes(garbage / "model.json"));
        g["artifacts"][0]["sha256"] = cxr::sha256_file(garbage / onnx);
        write_text(garbage / "model.json", g.dump(1));
    }
    expect(try_open(garbage), CXR_E_BACKEND, "backend: artifact is not an ONNX model", "openvino");

    // integrity (issue 14): every listed byte checksummed with SHA-256, nothing unlisted used
    const fs::path flipped = variant("flipped-byte", [](json&) {});
    {
        fs::remove(flipped / onnx);
        fs::copy_file(pkg / onnx, flipped / onnx);
        std::fstream f(flipped / onnx, std::ios::in | std::ios::out | std::ios::binary);
        f.seekg(-7, std::ios::end);
        char c = 0;
        f.read(&c, 1);
        c = static_cast<char>(c ^ 0x01);
        f.seekp(-7, std::ios::end);
        f.write(&c, 1);
    }
    expect(try_open(flipped), CXR_E_PACKAGE, "integrity: one flipped byte", "checksum mismatch");
    expect(try_open(variant("zero-sha", [](json& j) { j["artifacts"][0]["sha256"] = std::string(64, '0'); })),
           CXR_E_PACKAGE, "integrity: zeroed sha256", "checksum mismatch");
    expect(try_open(variant("null-sha", [](json& j) { j["artifacts"][0]["sha256"] = nullptr; })), CXR_E_PACKAGE,
           "integrity: sha256 null", "artifacts[0].sha256");
    const fs::path outside = variant("symlink-out", [](json&) {});
    fs::remove(outside / onnx);
    fs::create_symlink(fs::absolute(pkg / onnx), outside / onnx);
    expect(try_open(outside), CXR_E_PACKAGE, "integrity: symlink leaving the package", "symlink leaving");
    const fs::path unlisted = variant("unlisted-safetensors", [](json&) {});
    write_text(unlisted / "model.safetensors", "weights nobody listed");
    expect(try_open(unlisted), CXR_E_PACKAGE, "integrity: unlisted model.safetensors", "not listed");
    const fs::path deep = variant("deep-json", [](json&) {});
    write_text(deep / "model.json", "{\"a\": " + std::string(200000, '[') + std::string(200000, ']') + "}");
    expect(try_open(deep), CXR_E_PACKAGE, "package: 200000 levels of nesting", "nesting depth");

    // calls on an open model
    m = open_or_die(pkg.string(), "fp32");
    size_t k = 0;
    expect(cxr_num_classes(m, &k), CXR_OK, "num_classes");
    std::vector<float> p(k), t(1);
    cxr_image good = v.cases[0].image;
    expect(cxr_classify(m, &good, p.data(), p.size()), CXR_OK, "classify: valid image");
    expect(cxr_classify(nullptr, &good, p.data(), p.size()), CXR_E_INVALID_ARGUMENT, "classify: NULL model");
    expect(cxr_classify(m, nullptr, p.data(), p.size()), CXR_E_INVALID_ARGUMENT, "classify: NULL image");
    expect(cxr_classify(m, &good, nullptr, p.size()), CXR_E_INVALID_ARGUMENT, "classify: NULL probabilities");
    expect(cxr_classify(m, &good, p.data(), k - 1), CXR_E_BUFFER_TOO_SMALL, "classify: capacity < classes");
    const std::pair<std::string, std::function<void(cxr_image&)>> bad_images[] = {
        {"NULL pixels", [](cxr_image& i) { i.pixels = nullptr; }},
        {"width 0", [](cxr_image& i) { i.width = 0; }},
        {"height 0", [](cxr_image& i) { i.height = 0; }},
        {"1 pixel high", [](cxr_image& i) { i.height = 1; }},
        {"unknown pixel_type", [](cxr_image& i) { i.pixel_type = 7; }},
        {"u8 with bits_stored 12", [](cxr_image& i) { i.pixel_type = CXR_PIXEL_U8; i.bits_stored = 12; }},
        {"u16 with bits_stored 0", [](cxr_image& i) { i.pixel_type = CXR_PIXEL_U16; i.bits_stored = 0; i.width /= 2; }},
        {"u16 with bits_stored 17", [](cxr_image& i) { i.pixel_type = CXR_PIXEL_U16; i.bits_stored = 17; i.width /= 2; }},
        {"row_stride < row", [](cxr_image& i) { i.row_stride = i.width - 1; }},
        {"huge width", [](cxr_image& i) { i.width = 0xFFFFFFFFu; i.row_stride = 0; }},
    };
    for (const auto& [what, edit] : bad_images) {
        cxr_image b = good;
        edit(b);
        expect(cxr_classify(m, &b, p.data(), p.size()), CXR_E_INVALID_ARGUMENT, "classify: " + what);
        expect(cxr_preprocess(m, &b, t.data(), 0), CXR_E_INVALID_ARGUMENT, "preprocess: " + what);
    }
    std::vector<cxr_image> batch(4, good);
    batch[2].width = 0;
    std::vector<float> pb(batch.size() * k);
    expect(cxr_classify_batch(m, batch.data(), batch.size(), pb.data(), pb.size()), CXR_E_INVALID_ARGUMENT,
           "batch: third image bad", "image 2");
    expect(cxr_classify_batch(m, batch.data(), 0, pb.data(), pb.size()), CXR_E_INVALID_ARGUMENT, "batch: count 0");
    expect(cxr_classify_batch(m, nullptr, 2, pb.data(), pb.size()), CXR_E_INVALID_ARGUMENT, "batch: NULL images");
    batch[2] = good;
    expect(cxr_classify_batch(m, batch.data(), batch.size(), pb.data(), pb.size() - 1), CXR_E_BUFFER_TOO_SMALL,
           "batch: capacity one short");
    expect(cxr_classify_batch(m, batch.data(), static_cast<size_t>(-1) / 2, pb.data(), pb.size()),
           CXR_E_INVALID_ARGUMENT, "batch: count overflows", "too large");
    expect(cxr_classify_batch(m, batch.data(), batch.size(), pb.data(), pb.size()), CXR_OK, "batch: 4 valid images");
    expect(cxr_preprocess(m, &good, t.data(), t.size()), CXR_E_BUFFER_TOO_SMALL, "preprocess: capacity 1");
    expect(cxr_preprocess(m, &good, nullptr, 100), CXR_E_INVALID_ARGUMENT, "preprocess: NULL tensor");
    expect(cxr_preprocess(nullptr, &good, t.data(), t.size()), CXR_E_INVALID_ARGUMENT, "preprocess: NULL model");
    const char* s = nullptr;
    expect(cxr_class_name(m, k, &s), CXR_E_INVALID_ARGUMENT, "class_name: index == num_classes", "out of range");
    expect(cxr_class_name(m, 0, nullptr), CXR_E_INVALID_ARGUMENT, "class_name: NULL out");
    expect(cxr_num_classes(nullptr, &k), CXR_E_INVALID_ARGUMENT, "num_classes: NULL model");
    expect(cxr_get_property(m, static_cast<cxr_property>(999), &s), CXR_E_INVALID_ARGUMENT, "get_property: unknown key");
    expect(cxr_get_property(m, CXR_PROP_NAME, &s), CXR_OK, "get_property: name");
    uint32_t a = 0, b = 0;
    expect(cxr_input_shape(m, &a, &b, nullptr), CXR_E_INVALID_ARGUMENT, "input_shape: NULL width");
    cxr_close(m);
    cxr_close(nullptr);
    cxr_options_init(nullptr);
    if (std::string(cxr_status_name(static_cast<cxr_status>(42))).empty()) fail("status_name of unknown code");

    std::printf("errors: %s\n", g_failures ? "FAILED" : "all bad inputs returned their codes");
    return g_failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string usage = "usage: cxr_edge_tests preprocess|classify|threads|errors VECTORS_DIR [PRECISION|SCRATCH_DIR]";
    if (argc < 3) {
        std::cerr << usage << "\n";
        return 2;
    }
    const std::string cmd = argv[1];
    try {
        if (cmd == "preprocess") return test_preprocess(argv[2]);
        if (cmd == "classify") return test_classify(argv[2], argc > 3 ? argv[3] : "fp32");
        if (cmd == "threads") return test_threads(argv[2]);
        if (cmd == "errors" && argc > 3) return test_errors(argv[2], argv[3]);
    } catch (const std::exception& e) {
        std::cout << "FAIL: " << e.what() << "\n";
        return 1;
    }
    std::cerr << usage << "\n";
    return 2;
}
