// On-device verification (see verify.hpp). Statistics and the decision rule are those of
// cxr_edge/parity.py (compare, judge) and cxr_edge/formats.py (TOLERANCES, wilson_lower_bound).
#include "verify.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "common.hpp"
#include "tolerances.hpp"

namespace cxr {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

double wilson_lower_bound(std::size_t agree, std::size_t n) {
    if (n == 0) return 0.0;
    const double z = 1.959963984540054, p = static_cast<double>(agree) / n, z2 = z * z;
    const double centre = p + z2 / (2.0 * n);
    const double half = z * std::sqrt(p * (1 - p) / n + z2 / (4.0 * n * n));
    return std::max(0.0, (centre - half) / (1 + z2 / n));
}

std::string cpu_fingerprint() {
    std::ifstream f("/proc/cpuinfo");
    std::string line, model, flags;
    while (std::getline(f, line)) {
        const auto colon = line.find(':');
        if (colon == std::string::npos) continue;
        std::string key = line.substr(0, colon);
        key.erase(key.find_last_not_of(" \t") + 1);
        if (model.empty() && key == "model name") model = line.substr(colon + 1);
        if (flags.empty() && (key == "flags" || key == "Features")) flags = " " + line.substr(colon + 1) + " ";
        if (!model.empty() && !flags.empty()) break;
    }
    std::string feats;
    for (const char* fl : {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                           "amx_bf16", "amx_fp16", "amx_int8", "asimd", "asimdhp", "bf16", "i8mm", "sve"})
        if (flags.find(std::string(" ") + fl + " ") != std::string::npos) feats += std::string(fl) + ",";
    return "cpu:" + model + ":" + feats;
}

std::uint64_t fnv1a(const std::string& s) {
    std::uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

bool read_cached(const fs::path& path, const std::string& key, VerifyStats* st) {
    std::ifstream f(path);
    if (!f) return false;
    std::string k;
    if (!std::getline(f, k) || k != "key=" + key) return false;
    std::string line;
    int got = 0;
    while (std::getline(f, line)) {
        const auto eq = line.find('=');
        if (eq == std::string::npos) return false;
        const std::string name = line.substr(0, eq), v = line.substr(eq + 1);
        char* end = nullptr;
        const double x = std::strtod(v.c_str(), &end);
        if (end == v.c_str() || !std::isfinite(x)) return false;
        if (name == "n") st->n = static_cast<std::size_t>(x), ++got;
        else if (name == "agreement") st->agreement = x, ++got;
        else if (name == "lower_bound") st->lower_bound = x, ++got;
        else if (name == "max_abs_dp") st->max_abs_dp = x, ++got;
        else if (name == "p99_abs_dp") st->p99_abs_dp = x, ++got;
    }
    return got == 5 && st->n > 0;
}

void write_cached(const fs::path& path, const std::string& key, const VerifyStats& st) {
    std::error_code ec;
    fs::create_directories(path.parent_path(), ec);
    if (ec) return;  // a read-only cache only costs a re-measurement next time
    const fs::path tmp = path.string() + ".tmp" + std::to_string(std::rand());
    {
        std::ofstream f(tmp);
        if (!f) return;
        f.precision(17);
        f << "key=" << key << "\nn=" << st.n << "\nagreement=" << st.agreement << "\nlower_bound=" << st.lower_bound
          << "\nmax_abs_dp=" << st.max_abs_dp << "\np99_abs_dp=" << st.p99_abs_dp << "\n";
        if (!f) return;
    }
    fs::rename(tmp, path, ec);  // atomic on POSIX
    if (ec) fs::remove(tmp, ec);
}

void judge(const std::string& precision, VerifyStats* st) {
    const Tolerance* t = tolerance_for(precision.c_str());
    if (!t) throw Error(CXR_E_INTERNAL, "no tolerance for precision " + precision);
    std::vector<std::string> fails;
    auto pct = [](double v) { std::ostringstream o; o.precision(4); o << 100 * v << "%"; return o.str(); };
    if (st->agreement < t->min_agreement) fails.push_back("top-1 agreement " + pct(st->agreement) + " < " + pct(t->min_agreement));
    if (st->lower_bound < t->min_lower_bound)
        fails.push_back("agreement lower bound " + pct(st->lower_bound) + " < " + pct(t->min_lower_bound));
    if (st->max_abs_dp > t->max_abs_dp) {
        std::ostringstream o;
        o << "max |dp| " << st->max_abs_dp << " > " << t->max_abs_dp;
        fails.push_back(o.str());
    }
    st->passed = fails.empty();
    st->failures.clear();
    for (const auto& s : fails) st->failures += (st->failures.empty() ? "" : "; ") + s;
}

}  // namespace

bool needs_device_verdict(const std::string& backend, const std::string& precision) {
    return backend == "tensorrt" || precision == "bf16" || precision == "fp16";
}

fs::path verdict_dir(const std::string& cache_dir_option) {
    if (!cache_dir_option.empty()) return fs::path(cache_dir_option) / "native-verdicts";
    if (const char* c = std::getenv("CXR_EDGE_CACHE"); c && *c) return fs::path(c) / "native-verdicts";
    if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return fs::path(x) / "cxr-edge" / "native-verdicts";
    const char* home = std::getenv("HOME");
    return fs::path(home && *home ? home : ".") / ".cache" / "cxr-edge" / "native-verdicts";
}

VerifyStats verify_on_device(const Package& pkg, const Artifact& artifact, const std::string& backend,
                             const std::string& precision, const std::string& runtime_description,
                             const std::function<void(const float*, std::size_t, float*)>& probs,
                             const fs::path& cache_dir) {
    if (pkg.reference_set.file.empty())
        throw Error(CXR_E_UNAVAILABLE, pkg.root.string() + ": the package has no reference set to verify on");
    const std::string where = pkg.root.string() + ": reference_set";
    json rec;
    try {
        std::ifstream f(pkg.root / "model.json");
        rec = json::parse(f).at("reference_set");
    } catch (const std::exception& e) {
        throw Error(CXR_E_PACKAGE, where + ": " + e.what());
    }
    const std::string device = backend == "tensorrt" ? "cuda:" + runtime_description : cpu_fingerprint();
    const std::string key = artifact.sha256 + "|" + pkg.reference_set.sha256 + "|" + backend + "|" + precision + "|" +
                            runtime_description + "|" + device;
    char name[40];
    std::snprintf(name, sizeof name, "%016llx.txt", static_cast<unsigned long long>(fnv1a(key)));
    const fs::path cached = cache_dir / name;
    VerifyStats st;
    if (!cache_dir.empty() && read_cached(cached, key, &st)) {
        st.from_cache = true;
        judge(precision, &st);
        return st;
    }
    std::size_t k = 0, h = 0, w = 0;
    double scale = 65535;
    std::vector<std::vector<double>> ref;
    try {
        k = rec.at("shape").at(0).get<std::size_t>();
        h = rec.at("shape").at(1).get<std::size_t>();
        w = rec.at("shape").at(2).get<std::size_t>();
        if (rec.contains("scale")) scale = rec["scale"].get<double>();
        ref = rec.at("probabilities").get<std::vector<std::vector<double>>>();
    } catch (const std::exception& e) {
        throw Error(CXR_E_PACKAGE, where + ": malformed (" + e.what() + ")");
    }
    const std::size_t classes = pkg.classes.size();
    if (ref.size() != k) throw Error(CXR_E_PACKAGE, where + ": probabilities do not match shape[0]");
    for (const auto& r : ref)
        if (r.size() != classes) throw Error(CXR_E_PACKAGE, where + ": probabilities do not match the classes");
    const auto& spec = pkg.preprocess;
    if (h != static_cast<std::size_t>(spec.size) || w != static_cast<std::size_t>(spec.size))
        throw Error(CXR_E_PACKAGE, where + ": image size does not match the model input");
    std::ifstream f(pkg.root / pkg.reference_set.file, std::ios::binary);
    std::vector<unsigned char> raw(2 * k * h * w);
    if (!f.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size())))
        throw Error(CXR_E_PACKAGE, where + ": " + pkg.reference_set.file + " cannot be read or is truncated");

    // normalise exactly as cxr_edge.preprocess.normalise: float32 (x - mean) * float32(1 / std)
    constexpr std::size_t kBatch = 16;
    const std::size_t plane = h * w, sample = spec.tensor_size();
    std::vector<float> mean(spec.channels), inv(spec.channels);
    for (int c = 0; c < spec.channels; ++c) {
        mean[c] = static_cast<float>(spec.mean[c]);
        inv[c] = static_cast<float>(1.0 / spec.std[c]);
    }
    std::vector<float> tensors(kBatch * sample), out(kBatch * classes);
    std::vector<double> per_image_max;
    std::size_t agree = 0;
    for (std::size_t start = 0; start < k; start += kBatch) {
        const std::size_t n = std::min(kBatch, k - start);
        for (std::size_t i = 0; i < n; ++i) {
            const unsigned char* px = &raw[2 * (start + i) * plane];
            for (std::size_t p = 0; p < plane; ++p) {
                const float x = static_cast<float>(px[2 * p] | (px[2 * p + 1] << 8)) / static_cast<float>(scale);
                for (int c = 0; c < spec.channels; ++c) tensors[i * sample + c * plane + p] = (x - mean[c]) * inv[c];
            }
        }
        probs(tensors.data(), n, out.data());
        for (std::size_t i = 0; i < n; ++i) {
            const auto& r = ref[start + i];
            const float* q = &out[i * classes];
            std::size_t top_r = 0, top_q = 0;
            double m = 0;
            for (std::size_t j = 0; j < classes; ++j) {
                if (r[j] > r[top_r]) top_r = j;
                if (q[j] > q[top_q]) top_q = j;
                m = std::max(m, std::fabs(r[j] - static_cast<double>(q[j])));
            }
            agree += top_r == top_q;
            per_image_max.push_back(m);
        }
    }
    st.n = k;
    st.agreement = k ? static_cast<double>(agree) / k : 1.0;
    st.lower_bound = wilson_lower_bound(agree, k);
    std::vector<double> sorted = per_image_max;
    std::sort(sorted.begin(), sorted.end());
    st.max_abs_dp = sorted.empty() ? 0.0 : sorted.back();
    if (!sorted.empty()) {  // numpy.quantile's default (linear) interpolation
        const double pos = 0.99 * (sorted.size() - 1);
        const std::size_t lo = static_cast<std::size_t>(pos);
        const std::size_t hi = std::min(lo + 1, sorted.size() - 1);
        st.p99_abs_dp = sorted[lo] + (pos - lo) * (sorted[hi] - sorted[lo]);
    }
    judge(precision, &st);
    if (!cache_dir.empty()) write_cached(cached, key, st);
    return st;
}

}  // namespace cxr
