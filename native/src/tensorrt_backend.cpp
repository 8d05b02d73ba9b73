// TensorRT 10 backend: the C++ counterpart of cxr_edge/backends/tensorrt_backend.py. Compiled only
// when CMake finds TensorRT 10 and the CUDA toolkit (CXR_EDGE_HAVE_TENSORRT).
//
// Engines are built from the package's ONNX on first use, on the target GPU, and cached keyed by
// artifact checksum + GPU name + compute capability + TensorRT version + precision: an engine is
// not portable across any of those. The cache key differs from the Python one, so the two
// runtimes keep separate engine files.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

#include <NvInfer.h>
#include <NvOnnxParser.h>
#include <cuda_runtime_api.h>

#include "backend.hpp"
#include "common.hpp"

namespace cxr {
namespace {

namespace fs = std::filesystem;

constexpr int kMaxBatch = 32;  // same optimisation profile as the Python builder: 1 / 8 / 32

class Logger final : public nvinfer1::ILogger {
public:
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::fprintf(stderr, "cxr-edge tensorrt: %s\n", msg);
    }
};

Logger& logger() {
    static Logger l;
    return l;
}

void cuda_check(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
        throw Error(CXR_E_BACKEND, std::string("tensorrt: ") + what + " failed: " + cudaGetErrorString(err));
}

struct Gpu {
    std::string name;
    int major = 0, minor = 0;
};

Gpu gpu0() {
    cudaDeviceProp props{};
    cuda_check(cudaGetDeviceProperties(&props, 0), "cudaGetDeviceProperties");
    return Gpu{props.name, props.major, props.minor};
}

// FNV-1a: a stable file name for the cache key on every platform (std::hash is not).
std::string fnv1a_hex(const std::string& s) {
    std::uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) {
        h ^= c;
        h *= 1099511628211ull;
    }
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
    return buf;
}

fs::path cache_dir(const Options& o) {
    fs::path d;
    if (!o.cache_dir.empty()) d = o.cache_dir;
    else if (const char* env = std::getenv("CXR_EDGE_CACHE")) d = env;
    else if (const char* home = std::getenv("HOME")) d = fs::path(home) / ".cache" / "cxr-edge";
    else d = fs::temp_directory_path() / "cxr-edge";
    d /= "tensorrt";
    std::error_code ec;
    fs::create_directories(d, ec);
    if (ec) throw Error(CXR_E_BACKEND, "tensorrt: cannot create engine cache " + d.string() + ": " + ec.message());
    return d;
}

std::vector<char> build_engine(const std::string& onnx_path, const std::string& precision, int channels, int size) {
    std::unique_ptr<nvinfer1::IBuilder> builder(nvinfer1::createInferBuilder(logger()));
    if (!builder) throw Error(CXR_E_BACKEND, "tensorrt: createInferBuilder failed");
    std::unique_ptr<nvinfer1::INetworkDefinition> network(builder->createNetworkV2(0));
    std::unique_ptr<nvonnxparser::IParser> parser(nvonnxparser::createParser(*network, logger()));
    if (!network || !parser) throw Error(CXR_E_BACKEND, "tensorrt: cannot create a network or ONNX parser");
    if (!parser->parseFromFile(onnx_path.c_str(), static_cast<int>(nvinfer1::ILogger::Severity::kWARNING))) {
        std::string errs;
        for (int i = 0; i < parser->getNbErrors(); ++i) errs += std::string(i ? "; " : "") + parser->getError(i)->desc();
        throw Error(CXR_E_BACKEND, "tensorrt could not parse " + onnx_path + ": " + errs);
    }
    std::unique_ptr<nvinfer1::IBuilderConfig> config(builder->createBuilderConfig());
    config->setMemoryPoolLimit(nvinfer1::MemoryPoolType::kWORKSPACE, std::size_t(2) << 30);
    if (precision == "fp16") {
        config->setFlag(nvinfer1::BuilderFlag::kFP16);
    } else if (precision == "int8") {
        config->setFlag(nvinfer1::BuilderFlag::kINT8);  // scales come from the graph's Q/DQ nodes
        config->setFlag(nvinfer1::BuilderFlag::kFP16);  // layers left in float may use fp16
    }
    nvinfer1::IOptimizationProfile* profile = builder->createOptimizationProfile();
    const char* input = network->getInput(0)->getName();
    profile->setDimensions(input, nvinfer1::OptProfileSelector::kMIN, nvinfer1::Dims4(1, channels, size, size));
    profile->setDimensions(input, nvinfer1::OptProfileSelector::kOPT, nvinfer1::Dims4(8, channels, size, size));
    profile->setDimensions(input, nvinfer1::OptProfileSelector::kMAX, nvinfer1::Dims4(kMaxBatch, channels, size, size));
    config->addOptimizationProfile(profile);
    std::unique_ptr<nvinfer1::IHostMemory> serialized(builder->buildSerializedNetwork(*network, *config));
    if (!serialized) throw Error(CXR_E_BACKEND, "tensorrt engine build failed for " + onnx_path + " at " + precision);
    const char* p = static_cast<const char*>(serialized->data());
    return std::vector<char>(p, p + serialized->size());
}

// Device memory owned like a std::unique_ptr: freed on every path, including a throwing constructor.
struct DeviceBuffer {
    void* p = nullptr;
    DeviceBuffer() = default;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& o) noexcept : p(o.p) { o.p = nullptr; }
    ~DeviceBuffer() {
        if (p) cudaFree(p);
    }
    void allocate(std::size_t bytes) { cuda_check(cudaMalloc(&p, bytes), "cudaMalloc"); }
};

struct Stream {
    cudaStream_t s = nullptr;
    Stream() { cuda_check(cudaStreamCreate(&s), "cudaStreamCreate"); }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    ~Stream() {
        if (s) cudaStreamDestroy(s);
    }
};

std::int64_t volume(const nvinfer1::Dims& d, int from) {
    std::int64_t v = 1;
    for (int i = from; i < d.nbDims; ++i) v *= d.d[i];
    return v;
}

class TensorRTBackend final : public Backend {
public:
    TensorRTBackend(const Package& pkg, const Artifact& artifact, const std::string& precision, const Options& o)
        : precision_(precision) {
        channels_ = pkg.preprocess.channels;
        size_ = pkg.preprocess.size;
        classes_ = pkg.classes.size();
        const Gpu gpu = gpu0();
        device_ = "cuda:0 (" + gpu.name + ")";
        const std::string key = fnv1a_hex(artifact.sha256 + "|" + artifact.file + "|" + gpu.name + "|sm" +
                                          std::to_string(gpu.major) + "." + std::to_string(gpu.minor) + "|trt" +
                                          std::to_string(getInferLibVersion()) + "|" + precision + "|maxbatch" +
                                          std::to_string(kMaxBatch));
        const fs::path engine_path = cache_dir(o) / ("native-" + key + ".engine");
        std::vector<char> blob;
        if (fs::is_regular_file(engine_path)) {
            std::ifstream f(engine_path, std::ios::binary);
            blob.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
        } else {
            blob = build_engine(pkg.path(artifact).string(), precision, channels_, size_);
            const fs::path tmp = engine_path.string() + ".tmp";
            {
                std::ofstream f(tmp, std::ios::binary);
                f.write(blob.data(), static_cast<std::streamsize>(blob.size()));
            }
            std::error_code ec;
            fs::rename(tmp, engine_path, ec);  // atomic publish: a concurrent reader never sees half a file
        }
        runtime_.reset(nvinfer1::createInferRuntime(logger()));
        if (runtime_) engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
        if (!engine_)
            throw Error(CXR_E_BACKEND, "tensorrt could not deserialize engine " + engine_path.string() + "; delete it to rebuild");
        context_.reset(engine_->createExecutionContext());
        if (!context_) throw Error(CXR_E_BACKEND, "tensorrt could not create an execution context");

        for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
            const char* name = engine_->getIOTensorName(i);
            if (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT) {
                input_ = name;
            } else {
                if (engine_->getTensorDataType(name) != nvinfer1::DataType::kFLOAT)
                    throw Error(CXR_E_BACKEND, std::string("tensorrt: output ") + name + " is not float32");
                outputs_.push_back(Output{name, volume(engine_->getTensorShape(name), 1), DeviceBuffer{}});
            }
        }
        logits_ = outputs_.size();
        for (std::size_t i = 0; i < outputs_.size(); ++i)
            if (outputs_[i].name == "logits" || outputs_.size() == 1) logits_ = i;
        if (input_.empty() || logits_ == outputs_.size())
            throw Error(CXR_E_PACKAGE, artifact.file + ": expected an input and an output named 'logits'");
        if (outputs_[logits_].per_sample != static_cast<std::int64_t>(classes_))
            throw Error(CXR_E_PACKAGE, artifact.file + ": logits do not match the classes in model.json");

        stream_ = std::make_unique<Stream>();
        const std::size_t sample = static_cast<std::size_t>(channels_) * size_ * size_;
        input_buffer_.allocate(kMaxBatch * sample * sizeof(float));
        for (auto& out : outputs_) out.device.allocate(kMaxBatch * static_cast<std::size_t>(out.per_sample) * sizeof(float));
    }

    void infer(const float* input, std::size_t n, float* logits) override {
        // One execution context: callers take turns, as in the Python backend.
        std::lock_guard<std::mutex> lock(mutex_);
        const std::size_t sample = static_cast<std::size_t>(channels_) * size_ * size_;
        for (std::size_t start = 0; start < n; start += kMaxBatch) {
            const std::size_t m = std::min<std::size_t>(kMaxBatch, n - start);
            cudaStream_t stream = stream_->s;
            cuda_check(cudaMemcpyAsync(input_buffer_.p, input + start * sample, m * sample * sizeof(float),
                                       cudaMemcpyHostToDevice, stream),
                       "cudaMemcpyAsync");
            const nvinfer1::Dims4 shape(static_cast<std::int64_t>(m), channels_, size_, size_);
            if (!context_->setInputShape(input_.c_str(), shape) || !context_->setTensorAddress(input_.c_str(), input_buffer_.p))
                throw Error(CXR_E_BACKEND, "tensorrt: cannot bind the input");
            for (auto& out : outputs_)
                if (!context_->setTensorAddress(out.name.c_str(), out.device.p))
                    throw Error(CXR_E_BACKEND, "tensorrt: cannot bind output " + out.name);
            if (!context_->enqueueV3(stream)) throw Error(CXR_E_BACKEND, "tensorrt: enqueueV3 failed");
            cuda_check(cudaMemcpyAsync(logits + start * classes_, outputs_[logits_].device.p, m * classes_ * sizeof(float),
                                       cudaMemcpyDeviceToHost, stream),
                       "cudaMemcpyAsync");
            cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        }
    }

    std::string inference_precision() const override { return precision_; }
    std::string device() const override { return device_; }

private:
    struct Output {
        std::string name;
        std::int64_t per_sample;
        DeviceBuffer device;
    };
    std::string precision_, device_, input_;
    int channels_ = 3, size_ = 224;
    std::size_t classes_ = 0, logits_ = 0;
    std::unique_ptr<nvinfer1::IRuntime> runtime_;
    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::unique_ptr<nvinfer1::IExecutionContext> context_;
    std::vector<Output> outputs_;
    DeviceBuffer input_buffer_;
    std::unique_ptr<Stream> stream_;
    std::mutex mutex_;
};

}  // namespace

std::string tensorrt_unavailable_reason() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) return std::string("no usable NVIDIA GPU: ") + cudaGetErrorString(err);
    if (count == 0) return "no NVIDIA GPU";
    if (getInferLibVersion() / 10000 < 10) return "TensorRT " + std::to_string(getInferLibVersion()) + " is older than 10";
    return "";
}

std::string tensorrt_runtime_version() { return "tensorrt " + std::to_string(getInferLibVersion()); }

std::unique_ptr<Backend> open_tensorrt(const Package& pkg, const Artifact& artifact, const std::string& precision,
                                       const Options& options) {
    if (precision != "fp32" && precision != "fp16" && precision != "int8")
        throw Error(CXR_E_UNAVAILABLE, "tensorrt does not run precision " + precision);
    return std::make_unique<TensorRTBackend>(pkg, artifact, precision, options);
}

}  // namespace cxr
