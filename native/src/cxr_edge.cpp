// The C API: argument checks, backend/precision choice, batching and softmax. Every entry point
// runs its body inside guarded(), the one place C++ exceptions become status codes.
#include "cxr_edge.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstddef>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "backend.hpp"
#include "common.hpp"
#include "package.hpp"
#include "preprocess.hpp"
#include "verify.hpp"

struct cxr_model {
    cxr::Package pkg;
    std::unique_ptr<cxr::Backend> backend;
    std::string backend_name;
    std::string precision;
    std::string artifact;
    std::string inference_precision;
    std::string description;
    cxr::Options options;
    const cxr::Artifact* art = nullptr;  // into pkg.artifacts
    std::string verification;            // CXR_PROP_VERIFICATION
};

namespace {

using cxr::Error;

thread_local std::string g_last_error;

cxr_status record(cxr_status status, const char* message) noexcept {
    try {
        g_last_error = message;
    } catch (...) {
        g_last_error.clear();  // out of memory for the message itself: the code still tells
    }
    return status;
}

template <class F>
cxr_status guarded(F&& body) noexcept {
    g_last_error.clear();
    try {
        body();
        return CXR_OK;
    } catch (const Error& e) {
        return record(e.status(), e.what());
    } catch (const std::bad_alloc&) {
        return record(CXR_E_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) {
        return record(CXR_E_INTERNAL, e.what());
    } catch (...) {
        return record(CXR_E_INTERNAL, "unknown C++ exception");
    }
}

void require(bool ok, const char* message) {
    if (!ok) throw Error(CXR_E_INVALID_ARGUMENT, message);
}

// formats.py RUN_PRECISIONS / PRECISION_ORDER / BACKEND_ORDER, for the backends built in here.
const char* source_precision(const std::string& backend, const std::string& run) {
    if (backend == "openvino") {
        if (run == "fp32" || run == "bf16" || run == "fp16") return "fp32";
        if (run == "int8") return "int8";
    } else if (backend == "tensorrt") {
        if (run == "fp32" || run == "fp16") return "fp32";
        if (run == "int8") return "int8";
    }
    return nullptr;
}

std::vector<std::string> precision_order(const std::string& backend) {
    if (backend == "tensorrt") return {"int8", "fp16", "fp32"};
    return {"int8", "bf16", "fp16", "fp32"};
}

cxr::Options read_options(const cxr_options* o) {
    cxr::Options opt;
    if (!o) return opt;
    require(o->struct_size >= sizeof(cxr_options), "options->struct_size is not sizeof(cxr_options): call cxr_options_init first");
    if (o->backend) opt.backend = o->backend;
    if (o->precision) opt.precision = o->precision;
    if (o->device) opt.device = o->device;
    if (o->cache_dir) opt.cache_dir = o->cache_dir;
    require(o->num_threads >= 0, "options->num_threads must be >= 0");
    opt.num_threads = o->num_threads;
    require((o->flags & ~(CXR_FLAG_IGNORE_GATE | CXR_FLAG_THROUGHPUT | CXR_FLAG_VERIFY)) == 0,
            "options->flags has unknown bits");
    opt.flags = o->flags;
    if (opt.backend != "auto" && opt.backend != "openvino" && opt.backend != "tensorrt")
        throw Error(CXR_E_INVALID_ARGUMENT, "unknown backend '" + opt.backend + "'; known: auto, openvino, tensorrt");
    if (opt.precision != "auto" && opt.precision != "fp32" && opt.precision != "bf16" && opt.precision != "fp16" &&
        opt.precision != "int8")
        throw Error(CXR_E_INVALID_ARGUMENT,
                    "unknown precision '" + opt.precision + "'; known: auto, fp32, bf16, fp16, int8");
    require(!opt.device.empty(), "options->device is empty");
    return opt;
}

std::string join(const std::vector<std::string>& parts) {
    std::string s;
    for (const auto& p : parts) s += (s.empty() ? "" : "; ") + p;
    return s;
}

void softmax_rows(const float* logits, std::size_t rows, std::size_t k, float* out);

std::string runtime_description(const cxr_model& m) {
#ifdef CXR_EDGE_HAVE_TENSORRT
    if (m.backend_name == "tensorrt") return cxr::tensorrt_runtime_version() + " " + m.backend->device();
#endif
    return cxr::openvino_runtime_version() + " " + m.backend->device();
}

// Verify the open backend on the reference set (verify.hpp) and remember the summary for
// CXR_PROP_VERIFICATION.
cxr::VerifyStats verify_model(cxr_model& m, bool use_cache) {
    const std::size_t k = m.pkg.classes.size();
    std::vector<float> logits;
    auto probs = [&](const float* t, std::size_t n, float* out) {
        logits.resize(n * k);
        m.backend->infer(t, n, logits.data());
        softmax_rows(logits.data(), n, k, out);
    };
    const auto dir = use_cache ? cxr::verdict_dir(m.options.cache_dir) : std::filesystem::path();
    cxr::VerifyStats st = cxr::verify_on_device(m.pkg, *m.art, m.backend_name, m.precision, runtime_description(m),
                                                probs, dir);
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s %s on %zu reference images%s: agreement %.2f%% (95%% lower bound %.1f%%), "
                  "max |dp| %.2e, p99 |dp| %.2e: ", m.backend_name.c_str(), m.precision.c_str(), st.n,
                  st.from_cache ? " (cached)" : "", 100 * st.agreement, 100 * st.lower_bound, st.max_abs_dp,
                  st.p99_abs_dp);
    m.verification = std::string(buf) + (st.passed ? "passed" : "FAILED: " + st.failures);
    return st;
}

// The first (backend, precision) the package and machine allow, fastest first, falling back to the
// next when one fails to load: the choice cxr_edge.backends.load_best makes.
void choose_and_load(cxr_model& m, const cxr::Options& opt) {
    std::vector<std::string> backends;
    if (opt.backend == "auto") {
#ifdef CXR_EDGE_HAVE_TENSORRT
        backends.push_back("tensorrt");
#endif
        backends.push_back("openvino");
    } else {
        backends.push_back(opt.backend);
    }
    std::vector<std::string> skipped, errors;
    for (const auto& name : backends) {
#ifdef CXR_EDGE_HAVE_TENSORRT
        if (name == "tensorrt") {
            const std::string why = cxr::tensorrt_unavailable_reason();
            if (!why.empty()) {
                skipped.push_back("tensorrt: " + why);
                continue;
            }
        }
#else
        if (name == "tensorrt") {
            skipped.push_back("tensorrt: this libcxr_edge was built without TensorRT");
            continue;
        }
#endif
        const auto precs = opt.precision == "auto" ? precision_order(name) : std::vector<std::string>{opt.precision};
        for (const auto& prec : precs) {
            const char* src = source_precision(name, prec);
            if (!src) {
                skipped.push_back(name + " " + prec + ": not a precision " + name + " runs");
                continue;
            }
            const std::string fmt = std::string(src) == "int8" ? "onnx-qdq" : "onnx";
            const cxr::Artifact* art = m.pkg.artifact(src, fmt);
            if (!art) {
                skipped.push_back(name + " " + prec + ": package has no " + src + " " + fmt + " artifact");
                continue;
            }
            // with CXR_FLAG_VERIFY, combinations whose export verdict does not carry over are decided here
            const bool device_verdict = (opt.flags & CXR_FLAG_VERIFY) && cxr::needs_device_verdict(name, prec);
            if (!(opt.flags & CXR_FLAG_IGNORE_GATE) && !device_verdict && !art->passed_for(name, prec)) {
                skipped.push_back(name + " " + prec + ": " + art->file + " did not pass its parity gate");
                continue;
            }
            std::string why;
            if (name == "openvino" && !cxr::openvino_supports(prec, opt, &why)) {
                skipped.push_back(why);
                continue;
            }
            try {
#ifdef CXR_EDGE_HAVE_TENSORRT
                m.backend = name == "tensorrt" ? cxr::open_tensorrt(m.pkg, *art, prec, opt)
                                               : cxr::open_openvino(m.pkg, *art, prec, opt);
#else
                m.backend = cxr::open_openvino(m.pkg, *art, prec, opt);
#endif
            } catch (const Error& e) {
                if (e.status() == CXR_E_PACKAGE) throw;  // the package is wrong, not this backend
                errors.push_back(name + " " + prec + ": failed to load: " + e.what());
                continue;
            }
            m.backend_name = name;
            m.precision = prec;
            m.artifact = art->file;
            m.inference_precision = m.backend->inference_precision();
            m.description = name + " " + prec + " (inference precision " + m.inference_precision + ") on " +
                            m.backend->device() + " (" + art->file + ")";
            m.art = art;
            m.options = opt;
            if (device_verdict) {
                try {
                    const cxr::VerifyStats st = verify_model(m, true);
                    if (!st.passed) {
                        skipped.push_back(name + " " + prec + ": failed verification on this device: " + st.failures);
                        m.backend.reset();
                        continue;
                    }
                } catch (const Error& e) {
                    if (e.status() != CXR_E_UNAVAILABLE) throw;
                    skipped.push_back(name + " " + prec + ": cannot verify on this device: " + e.what());
                    m.backend.reset();
                    continue;
                }
            }
            return;
        }
    }
    const std::string what = "no usable backend for " + m.pkg.root.string() + " (backend=" + opt.backend +
                             ", precision=" + opt.precision + "): " + join(skipped) +
                             (errors.empty() ? "" : (skipped.empty() ? "" : "; ") + join(errors));
    throw Error(errors.empty() ? CXR_E_UNAVAILABLE : CXR_E_BACKEND, what);
}

void softmax_rows(const float* logits, std::size_t rows, std::size_t k, float* out) {
    // In double, like cxr_edge.classifier.softmax: float exp sums lose digits the parity test sees.
    std::vector<double> e(k);
    for (std::size_t r = 0; r < rows; ++r) {
        const float* z = logits + r * k;
        double mx = -std::numeric_limits<double>::infinity();
        for (std::size_t j = 0; j < k; ++j) mx = std::max(mx, static_cast<double>(z[j]));
        if (!std::isfinite(mx)) throw Error(CXR_E_BACKEND, "the model produced non-finite logits");
        double sum = 0.0;
        for (std::size_t j = 0; j < k; ++j) sum += (e[j] = std::exp(static_cast<double>(z[j]) - mx));
        if (!std::isfinite(sum)) throw Error(CXR_E_BACKEND, "the model produced non-finite logits");
        for (std::size_t j = 0; j < k; ++j) out[r * k + j] = static_cast<float>(e[j] / sum);
    }
}

void classify(cxr_model* model, const cxr_image* images, std::size_t count, float* probabilities, std::size_t capacity) {
    require(model != nullptr, "model is NULL");
    require(images != nullptr, "images is NULL");
    require(count > 0, "count is 0");
    require(probabilities != nullptr, "probabilities is NULL");
    const std::size_t k = model->pkg.classes.size();
    if (count > std::numeric_limits<std::size_t>::max() / k) throw Error(CXR_E_INVALID_ARGUMENT, "count is too large");
    if (capacity < count * k)
        throw Error(CXR_E_BUFFER_TOO_SMALL, "probabilities holds " + std::to_string(capacity) + " floats, " +
                                                std::to_string(count * k) + " needed (count x classes)");
    for (std::size_t i = 0; i < count; ++i) cxr::validate_image(&images[i], ("image " + std::to_string(i)).c_str());

    // Bounded batches keep memory flat for any count; 16 fills a CPU without a latency cliff.
    constexpr std::size_t kBatch = 16;
    const auto& spec = model->pkg.preprocess;
    const std::size_t sample = spec.tensor_size();
    std::vector<float> tensor(std::min(count, kBatch) * sample);
    std::vector<float> logits(std::min(count, kBatch) * k);
    for (std::size_t start = 0; start < count; start += kBatch) {
        const std::size_t n = std::min(kBatch, count - start);
        for (std::size_t i = 0; i < n; ++i) cxr::preprocess(images[start + i], spec, &tensor[i * sample]);
        model->backend->infer(tensor.data(), n, logits.data());
        softmax_rows(logits.data(), n, k, probabilities + start * k);
    }
}

}  // namespace

extern "C" {

const char* cxr_version(void) { return "0.1.0"; }

const char* cxr_last_error(void) { return g_last_error.c_str(); }

const char* cxr_status_name(cxr_status status) {
    switch (status) {
        case CXR_OK: return "CXR_OK";
        case CXR_E_INVALID_ARGUMENT: return "CXR_E_INVALID_ARGUMENT";
        case CXR_E_PACKAGE: return "CXR_E_PACKAGE";
        case CXR_E_UNAVAILABLE: return "CXR_E_UNAVAILABLE";
        case CXR_E_BACKEND: return "CXR_E_BACKEND";
        case CXR_E_BUFFER_TOO_SMALL: return "CXR_E_BUFFER_TOO_SMALL";
        case CXR_E_OUT_OF_MEMORY: return "CXR_E_OUT_OF_MEMORY";
        case CXR_E_INTERNAL: return "CXR_E_INTERNAL";
        case CXR_STATUS_MAX_ENUM: break;
    }
    return "CXR_E_UNKNOWN";
}

void cxr_options_init(cxr_options* options) {
    if (!options) return;
    *options = cxr_options{};
    options->struct_size = sizeof(cxr_options);
}

cxr_status cxr_open(const char* package_dir, const cxr_options* options, cxr_model** out_model) {
    if (out_model) *out_model = nullptr;
    return guarded([&] {
        require(out_model != nullptr, "out_model is NULL");
        require(package_dir != nullptr, "package_dir is NULL");
        require(*package_dir != '\0', "package_dir is empty");
        const cxr::Options opt = read_options(options);
        auto m = std::make_unique<cxr_model>();
        m->pkg = cxr::read_package(package_dir);
        choose_and_load(*m, opt);
        *out_model = m.release();
    });
}

void cxr_close(cxr_model* model) {
    try {
        delete model;
    } catch (...) {
        // a runtime throwing from its destructor must not take the caller down
    }
}

cxr_status cxr_num_classes(const cxr_model* model, size_t* out_count) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(out_count != nullptr, "out_count is NULL");
        *out_count = model->pkg.classes.size();
    });
}

cxr_status cxr_class_name(const cxr_model* model, size_t index, const char** out_name) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(out_name != nullptr, "out_name is NULL");
        if (index >= model->pkg.classes.size())
            throw Error(CXR_E_INVALID_ARGUMENT, "class index " + std::to_string(index) + " out of range (" +
                                                    std::to_string(model->pkg.classes.size()) + " classes)");
        *out_name = model->pkg.classes[index].c_str();
    });
}

cxr_status cxr_get_property(const cxr_model* model, cxr_property property, const char** out_value) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(out_value != nullptr, "out_value is NULL");
        switch (property) {
            case CXR_PROP_NAME: *out_value = model->pkg.name.c_str(); return;
            case CXR_PROP_BACKEND: *out_value = model->backend_name.c_str(); return;
            case CXR_PROP_PRECISION: *out_value = model->precision.c_str(); return;
            case CXR_PROP_ARTIFACT: *out_value = model->artifact.c_str(); return;
            case CXR_PROP_INFERENCE_PRECISION: *out_value = model->inference_precision.c_str(); return;
            case CXR_PROP_NORMAL_CLASS: *out_value = model->pkg.normal_class.c_str(); return;
            case CXR_PROP_DESCRIPTION: *out_value = model->description.c_str(); return;
            case CXR_PROP_VERIFICATION: *out_value = model->verification.c_str(); return;
            case CXR_PROP_MAX_ENUM: break;
        }
        throw Error(CXR_E_INVALID_ARGUMENT, "unknown property " + std::to_string(static_cast<int>(property)));
    });
}

cxr_status cxr_input_shape(const cxr_model* model, uint32_t* channels, uint32_t* height, uint32_t* width) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(channels && height && width, "channels, height and width must not be NULL");
        *channels = static_cast<uint32_t>(model->pkg.preprocess.channels);
        *height = *width = static_cast<uint32_t>(model->pkg.preprocess.size);
    });
}

cxr_status cxr_preprocess(const cxr_model* model, const cxr_image* image, float* tensor, size_t tensor_capacity) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(tensor != nullptr, "tensor is NULL");
        cxr::validate_image(image, "image");
        const std::size_t need = model->pkg.preprocess.tensor_size();
        if (tensor_capacity < need)
            throw Error(CXR_E_BUFFER_TOO_SMALL, "tensor holds " + std::to_string(tensor_capacity) + " floats, " +
                                                    std::to_string(need) + " needed");
        cxr::preprocess(*image, model->pkg.preprocess, tensor);
    });
}

cxr_status cxr_classify(cxr_model* model, const cxr_image* image, float* probabilities, size_t capacity) {
    return guarded([&] {
        require(image != nullptr, "image is NULL");
        classify(model, image, 1, probabilities, capacity);
    });
}

cxr_status cxr_classify_batch(cxr_model* model, const cxr_image* images, size_t count, float* probabilities,
                              size_t capacity) {
    return guarded([&] { classify(model, images, count, probabilities, capacity); });
}

void cxr_verify_result_init(cxr_verify_result* result) {
    if (!result) return;
    *result = cxr_verify_result{};
    result->struct_size = sizeof(cxr_verify_result);
}

cxr_status cxr_verify(cxr_model* model, int32_t use_cache, cxr_verify_result* result) {
    return guarded([&] {
        require(model != nullptr, "model is NULL");
        require(result != nullptr, "result is NULL");
        require(result->struct_size >= sizeof(cxr_verify_result),
                "result->struct_size is not sizeof(cxr_verify_result): call cxr_verify_result_init first");
        const cxr::VerifyStats st = verify_model(*model, use_cache != 0);
        result->n = static_cast<uint32_t>(st.n);
        result->agreement = st.agreement;
        result->lower_bound = st.lower_bound;
        result->max_abs_dp = st.max_abs_dp;
        result->p99_abs_dp = st.p99_abs_dp;
        result->passed = st.passed ? 1 : 0;
        result->from_cache = st.from_cache ? 1 : 0;
    });
}

}  // extern "C"
