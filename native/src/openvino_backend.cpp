// OpenVINO backend: the C++ counterpart of cxr_edge/backends/openvino_backend.py.
#include <algorithm>
#include <map>
#include <mutex>
#include <vector>

#include <openvino/openvino.hpp>

#include "backend.hpp"
#include "common.hpp"

namespace cxr {
namespace {

// Same table as the Python backend: int8 artifacts carry their own Q/DQ nodes and keep f32 for the rest.
const std::map<std::string, ov::element::Type>& hints() {
    static const std::map<std::string, ov::element::Type> h{
        {"fp32", ov::element::f32}, {"bf16", ov::element::bf16}, {"fp16", ov::element::f16}, {"int8", ov::element::f32}};
    return h;
}

class OpenVINOBackend final : public Backend {
public:
    OpenVINOBackend(const Package& pkg, const Artifact& artifact, const std::string& precision, const Options& o)
        : device_(o.device) {
        const auto& spec = pkg.preprocess;
        channels_ = spec.channels;
        size_ = spec.size;
        classes_ = pkg.classes.size();
        const std::string path = pkg.path(artifact).string();

        std::shared_ptr<ov::Model> model;
        try {
            model = core_.read_model(path);
        } catch (const std::exception& e) {
            throw Error(CXR_E_BACKEND, "openvino could not read " + artifact.file + ": " + e.what());
        }
        check_io(*model, artifact);

        ov::AnyMap config{ov::hint::inference_precision(hints().at(precision)),
                          ov::hint::performance_mode((o.flags & CXR_FLAG_THROUGHPUT)
                                                         ? ov::hint::PerformanceMode::THROUGHPUT
                                                         : ov::hint::PerformanceMode::LATENCY)};
        if (o.num_threads > 0) config.insert(ov::inference_num_threads(o.num_threads));
        if (!o.cache_dir.empty()) config.insert(ov::cache_dir(o.cache_dir));
        try {
            compiled_ = core_.compile_model(model, device_, config);
            effective_ = compiled_.get_property(ov::hint::inference_precision).to_string();
            const auto batch = compiled_.input().get_partial_shape()[0];
            static_batch_ = batch.is_static() ? static_cast<std::size_t>(batch.get_length()) : 0;
        } catch (const std::exception& e) {
            throw Error(CXR_E_BACKEND, "openvino could not compile " + artifact.file + " at " + precision + " on " +
                                           device_ + ": " + e.what());
        }
    }

    void infer(const float* input, std::size_t n, float* logits) override {
        const std::size_t sample = static_cast<std::size_t>(channels_) * size_ * size_;
        Lease lease(*this);
        // A model exported with a fixed batch runs in chunks of that batch, the last one zero-padded.
        const std::size_t chunk = static_batch_ ? static_batch_ : n;
        std::vector<float> padded;
        for (std::size_t start = 0; start < n; start += chunk) {
            const std::size_t m = std::min(chunk, n - start);
            const float* src = input + start * sample;
            if (static_batch_ && m < static_batch_) {
                padded.assign(static_batch_ * sample, 0.0f);
                std::copy(src, src + m * sample, padded.begin());
                src = padded.data();
            }
            const std::size_t rows = static_batch_ ? static_batch_ : m;
            try {
                // Wraps the caller's memory: OpenVINO only reads inputs, so no copy is needed.
                ov::Tensor in(ov::element::f32, ov::Shape{rows, static_cast<std::size_t>(channels_),
                                                          static_cast<std::size_t>(size_), static_cast<std::size_t>(size_)},
                              const_cast<float*>(src));
                lease.req.set_input_tensor(in);
                lease.req.infer();
                const ov::Tensor out = lease.req.get_tensor(compiled_.output(logits_index_));
                if (out.get_element_type() != ov::element::f32 || out.get_shape() != ov::Shape{rows, classes_})
                    throw Error(CXR_E_BACKEND, "openvino returned logits of shape " + out.get_shape().to_string() + " " +
                                                   out.get_element_type().to_string() + ", expected [" +
                                                   std::to_string(rows) + "," + std::to_string(classes_) + "] f32");
                std::copy(out.data<const float>(), out.data<const float>() + m * classes_, logits + start * classes_);
            } catch (const Error&) {
                throw;
            } catch (const std::exception& e) {
                throw Error(CXR_E_BACKEND, std::string("openvino inference failed: ") + e.what());
            }
        }
    }

    std::string inference_precision() const override { return effective_; }
    std::string device() const override { return device_; }

private:
    // An infer request per concurrent caller, reused: creating one per call costs allocations,
    // sharing one would serialise callers.
    struct Lease {
        explicit Lease(OpenVINOBackend& b) : owner(b) {
            std::lock_guard<std::mutex> lock(b.pool_mutex_);
            if (b.pool_.empty()) {
                try {
                    req = b.compiled_.create_infer_request();
                } catch (const std::exception& e) {
                    throw Error(CXR_E_BACKEND, std::string("openvino could not create an infer request: ") + e.what());
                }
            } else {
                req = std::move(b.pool_.back());
                b.pool_.pop_back();
            }
        }
        ~Lease() {
            try {
                std::lock_guard<std::mutex> lock(owner.pool_mutex_);
                owner.pool_.push_back(std::move(req));
            } catch (...) {
                // Losing a request to an allocation failure only costs re-creating it later.
            }
        }
        OpenVINOBackend& owner;
        ov::InferRequest req;
    };

    void check_io(const ov::Model& model, const Artifact& artifact) {
        const std::string f = artifact.file;
        if (model.inputs().size() != 1)
            throw Error(CXR_E_PACKAGE, f + ": expected one input, the model has " + std::to_string(model.inputs().size()));
        const auto in = model.input().get_partial_shape();
        const std::int64_t want[] = {channels_, size_, size_};
        bool ok = in.rank().is_static() && in.rank().get_length() == 4;
        for (int i = 0; ok && i < 3; ++i) ok = in[i + 1].is_dynamic() || in[i + 1].get_length() == want[i];
        if (!ok)
            throw Error(CXR_E_PACKAGE, f + ": input shape " + in.to_string() + " does not match the package's preprocessing (N," +
                                           std::to_string(channels_) + "," + std::to_string(size_) + "," +
                                           std::to_string(size_) + ")");
        // The logits output by name, as the Python backend takes it; a single unnamed output also does.
        const auto outputs = model.outputs();
        logits_index_ = outputs.size();
        for (std::size_t i = 0; i < outputs.size(); ++i)
            if (outputs[i].get_names().count("logits")) logits_index_ = i;
        if (logits_index_ == outputs.size() && outputs.size() == 1) logits_index_ = 0;
        if (logits_index_ == outputs.size()) throw Error(CXR_E_PACKAGE, f + ": no output named 'logits'");
        const auto out = outputs[logits_index_].get_partial_shape();
        if (out.rank().is_dynamic() || out.rank().get_length() != 2 || out[1].is_dynamic() ||
            static_cast<std::size_t>(out[1].get_length()) != classes_)
            throw Error(CXR_E_PACKAGE, f + ": logits shape " + out.to_string() + " does not match the " +
                                           std::to_string(classes_) + " classes in model.json");
    }

    ov::Core core_;
    ov::CompiledModel compiled_;
    std::string device_;
    std::string effective_;
    std::size_t logits_index_ = 0;
    std::size_t static_batch_ = 0;
    std::int64_t channels_ = 3;
    std::int64_t size_ = 224;
    std::size_t classes_ = 0;
    std::mutex pool_mutex_;
    std::vector<ov::InferRequest> pool_;
};

}  // namespace

std::string openvino_runtime_version() { return std::string("openvino ") + ov::get_openvino_version().buildNumber; }

bool openvino_supports(const std::string& precision, const Options& options, std::string* why) {
    if (precision != "bf16" && precision != "fp16") return true;
    const std::string cap = precision == "bf16" ? "BF16" : "FP16";
    try {
        ov::Core core;
        const auto caps = core.get_property(options.device, ov::device::capabilities);
        if (std::find(caps.begin(), caps.end(), cap) != caps.end()) return true;
        if (why) *why = "openvino " + precision + ": " + options.device + " has no native " + precision +
                        " (OPTIMIZATION_CAPABILITIES lacks " + cap + ")";
    } catch (const std::exception& e) {
        if (why) *why = "openvino " + precision + ": cannot query " + options.device + " capabilities: " + e.what();
    }
    return false;
}

std::unique_ptr<Backend> open_openvino(const Package& pkg, const Artifact& artifact, const std::string& precision,
                                       const Options& options) {
    if (!hints().count(precision)) throw Error(CXR_E_UNAVAILABLE, "openvino does not run precision " + precision);
    return std::make_unique<OpenVINOBackend>(pkg, artifact, precision, options);
}

}  // namespace cxr
