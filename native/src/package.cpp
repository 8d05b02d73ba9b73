// model.json reader. Mirrors ModelPackage.read / PreprocessSpec in cxr_edge (the one source of
// truth for the format): a package the Python runtime refuses is refused here with the same reason.
#include "package.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include "common.hpp"

namespace cxr {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int kSchemaVersion = 1;
constexpr int kMaxDepth = 64;                         // package.py MAX_JSON_DEPTH
constexpr std::uintmax_t kMaxJsonBytes = 64u << 20;   // package.py MAX_JSON_BYTES
// An ONNX TensorProto external_data entry {key: "location", ...} as protobuf bytes (package.py
// _EXTERNAL_DATA_MARK). A file without it has no tensor stored outside itself. Found, the file is
// refused (the Python reader confirms with the onnx parser; a 10-byte accidental match in weights
// is a ~2^-80 event per position).
constexpr char kExternalMark[] = "\x0a\x08location";
constexpr std::size_t kExternalMarkLen = sizeof(kExternalMark) - 1;

[[noreturn]] void fail(const std::string& msg) { throw Error(CXR_E_PACKAGE, msg); }

bool is_int(const json& v) { return v.is_number_integer() || v.is_number_unsigned(); }

// package.py WEIGHT_SUFFIXES: an unlisted file with one of these suffixes refuses the package.
const std::set<std::string>& weight_suffixes() {
    static const std::set<std::string> s{".onnx", ".data", ".onnx_data", ".bin", ".xml", ".safetensors", ".pt",
                                         ".pth", ".ckpt", ".pkl", ".npy", ".npz", ".u16", ".engine", ".plan",
                                         ".trt", ".pb", ".tflite", ".h5", ".blob"};
    return s;
}

bool plain_name(const std::string& f) {
    return !f.empty() && f != "." && f != ".." && f.find('/') == std::string::npos &&
           f.find('\\') == std::string::npos && f.find('\0') == std::string::npos;
}

bool is_sha256_hex(const std::string& s) {
    return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

struct Fd {
    int fd = -1;
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
};

struct MdCtx {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    ~MdCtx() { EVP_MD_CTX_free(ctx); }
};

// SHA-256 of exactly `size` bytes from `fd` (more or fewer is an error); `external` reports the
// ONNX external-data mark when `scan` is set.
std::string hash_fd(int fd, std::int64_t size, bool scan, bool* external, const std::string& what) {
    MdCtx md;
    if (!md.ctx || EVP_DigestInit_ex(md.ctx, EVP_sha256(), nullptr) != 1) fail(what + ": cannot initialise SHA-256");
    std::vector<char> buf(std::size_t{4} << 20);
    std::string tail;
    std::int64_t total = 0;
    for (;;) {
        const ssize_t n = ::read(fd, buf.data(), buf.size());
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(what + " cannot be read (" + std::strerror(errno) + ")");
        }
        if (n == 0) break;
        total += n;
        if (total > size) fail(what + " grew while it was read: corrupted or replaced");
        if (EVP_DigestUpdate(md.ctx, buf.data(), static_cast<std::size_t>(n)) != 1) fail(what + ": SHA-256 failed");
        if (scan && !*external) {
            const std::size_t head = std::min<std::size_t>(static_cast<std::size_t>(n), kExternalMarkLen);
            const std::string edge = tail + std::string(buf.data(), head);
            *external = edge.find(kExternalMark, 0, kExternalMarkLen) != std::string::npos ||
                        std::search(buf.data(), buf.data() + n, kExternalMark, kExternalMark + kExternalMarkLen) !=
                            buf.data() + n;
            const std::size_t keep = std::min<std::size_t>(static_cast<std::size_t>(n), kExternalMarkLen);
            tail.assign(buf.data() + n - keep, keep);
        }
    }
    if (total != size) fail(what + " changed while it was read: corrupted or replaced");
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (EVP_DigestFinal_ex(md.ctx, digest, &len) != 1) fail(what + ": SHA-256 failed");
    static const char hex[] = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < len; ++i) {
        out += hex[digest[i] >> 4];
        out += hex[digest[i] & 15];
    }
    return out;
}

// package.py verify_file: a plain name, a regular file inside the package (a symlink only to a
// file inside it), `size` bytes (compared before reading), then SHA-256; ONNX without external data.
void verify_file(const fs::path& root, const std::string& name, const std::string& sha256, std::int64_t size,
                 const std::string& field, bool onnx) {
    const std::string what = root.string() + ": " + field + " file " + name;
    if (!plain_name(name)) fail(root.string() + ": " + field + " file '" + name + "' must be a plain name inside the package");
    const fs::path p = root / name;
    struct stat st {};
    if (::lstat(p.c_str(), &st) != 0) {
        if (errno == ENOENT) fail(root.string() + ": " + field + " file " + name + " listed in model.json is missing");
        fail(what + " cannot be read (" + std::strerror(errno) + ")");
    }
    if (S_ISLNK(st.st_mode)) {
        std::error_code e1, e2;
        const fs::path target = fs::weakly_canonical(p, e1);
        const fs::path inside = fs::weakly_canonical(root, e2);
        const fs::path rel = target.lexically_relative(inside);
        if (e1 || e2 || rel.empty() || rel == "." || *rel.begin() == "..")
            fail(what + " is a symlink leaving the package (to " + target.string() + "); copy the file into the package");
    }
    Fd f;
    f.fd = ::open(p.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (f.fd < 0) fail(what + " cannot be opened (" + std::strerror(errno) + ")");
    if (::fstat(f.fd, &st) != 0) fail(what + " cannot be read (" + std::strerror(errno) + ")");
    if (!S_ISREG(st.st_mode)) fail(what + " is not a regular file");
    if (static_cast<std::int64_t>(st.st_size) != size)
        fail(root.string() + ": " + field + " file " + name + " has " + std::to_string(st.st_size) +
             " bytes, model.json says " + std::to_string(size) + ": corrupted or replaced");
    bool external = false;
    const std::string digest = hash_fd(f.fd, size, onnx, &external, what);
    if (digest != sha256)
        fail(what + " checksum mismatch (model.json " + sha256.substr(0, 12) + "..., file " + digest.substr(0, 12) +
             "...): corrupted or replaced");
    if (external)
        fail(what + " keeps weights in ONNX external data, which its checksum does not cover; re-export with the "
                    "weights embedded");
}

// {file, sha256, bytes}: the schema's file_record.
FileRecord file_record(const json& r, const std::string& field, const std::string& where) {
    if (!r.is_object()) fail(where + ": " + field + ": must be object");
    for (auto it = r.begin(); it != r.end(); ++it)
        if (it.key() != "file" && it.key() != "sha256" && it.key() != "bytes")
            fail(where + ": " + field + "." + it.key() + ": unexpected key");
    FileRecord fr;
    if (!r.contains("file") || !r["file"].is_string()) fail(where + ": " + field + ".file: missing or not a string");
    fr.file = r["file"].get<std::string>();
    if (!r.contains("sha256") || !r["sha256"].is_string() || !is_sha256_hex(r["sha256"].get<std::string>()))
        fail(where + ": " + field + ".sha256: must be 64 lowercase hex digits");
    fr.sha256 = r["sha256"].get<std::string>();
    if (!r.contains("bytes") || !is_int(r["bytes"]) || r["bytes"].get<long long>() < 0)
        fail(where + ": " + field + ".bytes: must be a non-negative integer");
    fr.bytes = r["bytes"].get<std::int64_t>();
    return fr;
}

std::vector<double> number_list(const json& v, const char* key, const std::string& where) {
    if (!v.is_array()) fail(where + ": bad preprocess spec: " + key + " must be a list of numbers");
    std::vector<double> out;
    for (const auto& x : v) {
        if (!x.is_number()) fail(where + ": bad preprocess spec: " + key + " must be a list of numbers");
        out.push_back(x.get<double>());
    }
    return out;
}

PreprocessSpec spec_from_json(const json& d, const std::string& where) {
    static const std::set<std::string> known{"size",     "resize", "resize_size", "interpolation",
                                             "channels", "mean",   "std",         "reducing_gap"};
    if (!d.is_object()) fail(where + ": 'preprocess' missing or not a dict");
    std::string unknown;
    for (auto it = d.begin(); it != d.end(); ++it)
        if (!known.count(it.key())) unknown += (unknown.empty() ? "" : ", ") + it.key();
    if (!unknown.empty()) fail(where + ": bad preprocess spec: unknown preprocessing keys [" + unknown + "]");

    PreprocessSpec s;
    const std::string bad = where + ": bad preprocess spec: ";
    if (d.contains("size")) {
        if (!is_int(d["size"]) || d["size"].get<long long>() < 1 || d["size"].get<long long>() > 8192)
            fail(bad + "size must be an integer 1..8192");
        s.size = d["size"].get<int>();
    }
    std::string resize = "stretch";
    if (d.contains("resize")) {
        if (!d["resize"].is_string()) fail(bad + "resize must be a string");
        resize = d["resize"].get<std::string>();
    }
    if (resize != "stretch" && resize != "shorter_side_crop")
        fail(bad + "resize policy '" + resize + "' unknown; expected one of ('stretch', 'shorter_side_crop')");
    s.shorter_side_crop = resize == "shorter_side_crop";
    if (d.contains("interpolation")) {
        if (!d["interpolation"].is_string() || d["interpolation"].get<std::string>() != "bilinear")
            fail(bad + "interpolation " + d["interpolation"].dump() + " unsupported; only 'bilinear'");
    }
    if (d.contains("channels")) {
        if (!is_int(d["channels"])) fail(bad + "channels must be 1 or 3");
        const long long ch = d["channels"].get<long long>();
        if (ch != 1 && ch != 3) fail(bad + "channels must be 1 or 3, got " + std::to_string(ch));
        s.channels = static_cast<int>(ch);
    }
    if (d.contains("mean")) s.mean = number_list(d["mean"], "mean", where);
    if (d.contains("std")) s.std = number_list(d["std"], "std", where);
    if (static_cast<int>(s.mean.size()) != s.channels || static_cast<int>(s.std.size()) != s.channels)
        fail(bad + "mean/std need " + std::to_string(s.channels) + " values each");
    for (double v : s.mean)
        if (!std::isfinite(v)) fail(where + ": preprocess.mean: must be finite numbers");
    for (double v : s.std)
        if (!std::isfinite(v)) fail(where + ": preprocess.std: must be finite numbers");
    for (double v : s.std)
        if (!(v > 0)) fail(bad + "std must be positive");
    if (d.contains("resize_size") && !d["resize_size"].is_null()) {
        if (!is_int(d["resize_size"]) || d["resize_size"].get<long long>() < 1 || d["resize_size"].get<long long>() > 65536)
            fail(bad + "resize_size must be an integer");
        s.resize_size = d["resize_size"].get<int>();
    }
    if (s.shorter_side_crop && s.resize_size < s.size) fail(bad + "shorter_side_crop needs resize_size >= size");
    if (d.contains("reducing_gap") && !d["reducing_gap"].is_null()) {  // preprocessing v2 (H18)
        const json& g = d["reducing_gap"];
        if (!g.is_number() || g.is_boolean() || !(g.get<double>() >= 1.0 && g.get<double>() <= 64.0))
            fail(bad + "reducing_gap must be a number from 1 to 64 (or absent), got " + g.dump());
        s.reducing_gap = g.get<double>();
    }
    return s;
}

Artifact artifact_from_json(const json& a, std::size_t i, const std::string& where) {
    static const std::set<std::string> known{"file", "sha256", "bytes", "format", "precision",
                                             "outputs", "companions", "parity", "gate", "extra"};
    const std::string bad = where + ": artifact #" + std::to_string(i) + " malformed: ";
    if (!a.is_object()) fail(bad + "not an object");
    for (auto it = a.begin(); it != a.end(); ++it)
        if (!known.count(it.key())) fail(bad + "unexpected key '" + it.key() + "'");
    Artifact art;
    for (const char* key : {"file", "format", "precision"}) {
        if (!a.contains(key) || !a[key].is_string()) fail(bad + "'" + key + "' missing or not a string");
    }
    art.file = a["file"].get<std::string>();
    art.format = a["format"].get<std::string>();
    art.precision = a["precision"].get<std::string>();
    // A plain file name: model.json must not point outside its own directory.
    if (art.file.empty() || art.file == "." || art.file == ".." || art.file.find('/') != std::string::npos ||
        art.file.find('\\') != std::string::npos || art.file.find('\0') != std::string::npos)
        fail(where + ": artifact file '" + art.file + "' must be a plain name inside the package");
    const std::string field = "artifacts[" + std::to_string(i) + "]";
    if (!a.contains("sha256") || !a["sha256"].is_string() || !is_sha256_hex(a["sha256"].get<std::string>()))
        fail(where + ": " + field + ".sha256: must be 64 lowercase hex digits, got " +
             (a.contains("sha256") ? a["sha256"].dump().substr(0, 70) : std::string("nothing")));
    art.sha256 = a["sha256"].get<std::string>();
    if (!a.contains("bytes") || !is_int(a["bytes"]) || a["bytes"].get<long long>() < 0)
        fail(where + ": " + field + ".bytes: must be a non-negative integer");
    art.bytes = a["bytes"].get<std::int64_t>();
    if (a.contains("companions")) {
        if (!a["companions"].is_array()) fail(where + ": " + field + ".companions: must be array");
        std::size_t j = 0;
        for (const auto& c : a["companions"])
            art.companions.push_back(file_record(c, field + ".companions[" + std::to_string(j++) + "]", where));
    }
    if (art.format == "openvino-ir") {
        const std::string bin = fs::path(art.file).replace_extension(".bin").string();
        bool listed = false;
        for (const auto& c : art.companions) listed |= c.file == bin;
        if (!listed)
            fail(where + ": " + field + ": OpenVINO IR " + art.file + " needs its weights " + bin +
                 " listed in 'companions' with sha256 and bytes");
    }
    if (a.contains("outputs")) {
        if (!a["outputs"].is_array()) fail(bad + "'outputs' must be a list");
        for (const auto& o : a["outputs"]) {
            if (!o.is_string()) fail(bad + "'outputs' must be a list of names");
            art.outputs.push_back(o.get<std::string>());
        }
    } else {
        art.outputs = {"logits"};
    }
    if (a.contains("gate")) {
        if (!a["gate"].is_object()) fail(bad + "'gate' must be an object");
        for (auto it = a["gate"].begin(); it != a["gate"].end(); ++it) {
            const json& rec = it.value();
            if (!rec.is_object()) fail(where + ": artifacts[" + std::to_string(i) + "].gate." + it.key() + ": must be object");
            // Only an explicit true passes: anything else (missing, null, a string) is a failed gate.
            art.gate_passed[it.key()] =
                rec.is_object() && rec.contains("passed") && rec["passed"].is_boolean() && rec["passed"].get<bool>();
        }
    }
    return art;
}

// At most kMaxJsonBytes: a model.json that is really an endless special file cannot hang the reader.
std::string read_text(const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    if (!f) fail(p.string() + ": cannot be read");
    std::string text;
    std::vector<char> buf(1 << 16);
    while (f) {
        f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
        text.append(buf.data(), static_cast<std::size_t>(f.gcount()));
        if (text.size() > kMaxJsonBytes)
            fail(p.string() + ": more than the " + std::to_string(kMaxJsonBytes) + " bytes allowed");
    }
    if (f.bad()) fail(p.string() + ": read error");
    return text;
}

}  // namespace

bool Artifact::passed_for(const std::string& backend, const std::string& run_precision) const {
    auto it = gate_passed.find(backend + "/" + run_precision);
    return it != gate_passed.end() && it->second;
}

const Artifact* Package::artifact(const std::string& precision, const std::string& format) const {
    for (const auto& a : artifacts)
        if (a.precision == precision && a.format == format) return &a;
    return nullptr;
}

PreprocessSpec parse_preprocess_spec(const std::string& json_text) {
    json d;
    try {
        d = json::parse(json_text);
    } catch (const json::exception& e) {
        fail(std::string("preprocess spec: not valid JSON (") + e.what() + ")");
    }
    return spec_from_json(d, "preprocess spec");
}

std::string sha256_file(const fs::path& path) {
    Fd f;
    f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (f.fd < 0) fail(path.string() + ": cannot be opened (" + std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode)) fail(path.string() + ": not a regular file");
    bool external = false;
    return hash_fd(f.fd, st.st_size, false, &external, path.string());
}

Package read_package(const fs::path& dir) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) fail(dir.string() + ": model package directory not found");
    const fs::path meta_path = dir / "model.json";
    if (!fs::is_regular_file(meta_path, ec)) fail(dir.string() + ": no model.json in the model package");
    const std::string where = meta_path.string();

    const auto json_size = fs::file_size(meta_path, ec);
    if (!ec && json_size > kMaxJsonBytes)
        fail(where + ": " + std::to_string(json_size) + " bytes, more than the " + std::to_string(kMaxJsonBytes) + " allowed");
    json meta;
    try {
        // Bounded nesting: deeper input is refused while parsing, before it is built.
        meta = json::parse(read_text(meta_path), [&](int depth, json::parse_event_t, json&) {
            if (depth > kMaxDepth)
                fail(where + ": nesting depth exceeds the limit of " + std::to_string(kMaxDepth));
            return true;
        });
    } catch (const json::exception& e) {
        fail(where + ": not valid JSON (" + e.what() + ")");
    }
    if (!meta.is_object()) fail(where + ": top level must be an object");
    if (!meta.contains("schema_version") || !is_int(meta["schema_version"]))
        fail(where + ": schema_version missing or not an integer");
    const long long version = meta["schema_version"].get<long long>();
    if (version > kSchemaVersion)
        fail(where + ": schema_version " + std::to_string(version) + " is newer than this cxr-edge understands (" +
             std::to_string(kSchemaVersion) + "); upgrade cxr-edge");
    const std::pair<const char*, json::value_t> required[] = {{"name", json::value_t::string},
                                                              {"classes", json::value_t::array},
                                                              {"preprocess", json::value_t::object},
                                                              {"artifacts", json::value_t::array}};
    for (const auto& [key, type] : required) {
        if (!meta.contains(key) || meta[key].type() != type) {
            const char* want = type == json::value_t::string ? "str" : type == json::value_t::array ? "list" : "dict";
            fail(where + ": '" + key + "' missing or not a " + want);
        }
    }

    Package pkg;
    pkg.root = dir;
    pkg.name = meta["name"].get<std::string>();
    std::set<std::string> seen;
    for (const auto& c : meta["classes"]) {
        if (!c.is_string() || c.get<std::string>().empty() || !seen.insert(c.get<std::string>()).second)
            fail(where + ": 'classes' must be 2+ distinct non-empty names, got " + meta["classes"].dump());
        pkg.classes.push_back(c.get<std::string>());
    }
    if (pkg.classes.size() < 2)
        fail(where + ": 'classes' must be 2+ distinct non-empty names, got " + meta["classes"].dump());
    if (meta.contains("normal_class") && !meta["normal_class"].is_null()) {
        const json& n = meta["normal_class"];
        if (!n.is_string() || !seen.count(n.get<std::string>()))
            fail(where + ": normal_class " + n.dump() + " is not one of the classes " + meta["classes"].dump());
        pkg.normal_class = n.get<std::string>();
    }
    pkg.preprocess = spec_from_json(meta["preprocess"], where);

    std::set<std::string> listed{"model.json"};
    auto list_once = [&](const std::string& name, const std::string& field) {
        if (!listed.insert(name).second) fail(where + ": " + field + ".file: " + name + " is listed twice");
    };
    std::size_t i = 0;
    for (const auto& a : meta["artifacts"]) {
        Artifact art = artifact_from_json(a, i, where);
        const std::string field = "artifacts[" + std::to_string(i++) + "]";
        list_once(art.file, field);
        verify_file(dir, art.file, art.sha256, art.bytes, field, art.format == "onnx" || art.format == "onnx-qdq");
        for (std::size_t j = 0; j < art.companions.size(); ++j) {
            const auto& c = art.companions[j];
            const std::string cf = field + ".companions[" + std::to_string(j) + "]";
            list_once(c.file, cf);
            verify_file(dir, c.file, c.sha256, c.bytes, cf, false);
        }
        pkg.artifacts.push_back(std::move(art));
    }
    if (meta.contains("reference_set") && !meta["reference_set"].is_null()) {
        const json& r = meta["reference_set"];
        if (!r.is_object()) fail(where + ": reference_set: must be object");
        json rec = json::object();
        for (const char* key : {"file", "sha256", "bytes"})
            if (r.contains(key)) rec[key] = r[key];
        pkg.reference_set = file_record(rec, "reference_set", where);
        const json& shape = r.contains("shape") ? r["shape"] : json();
        if (!shape.is_array() || shape.size() != 3 || !std::all_of(shape.begin(), shape.end(), [](const json& x) {
                return is_int(x) && x.get<long long>() >= 1;
            }))
            fail(where + ": reference_set.shape: must be [K, size, size] positive integers");
        const long long k = shape[0].get<long long>(), h = shape[1].get<long long>(), w = shape[2].get<long long>();
        if (h != pkg.preprocess.size || w != pkg.preprocess.size)
            fail(where + ": reference_set.shape: " + shape.dump() + " does not match the input size " +
                 std::to_string(pkg.preprocess.size));
        if (pkg.reference_set.bytes != 2 * k * h * w)
            fail(where + ": reference_set.bytes: " + std::to_string(pkg.reference_set.bytes) + " is not 2 x " +
                 std::to_string(k) + " x " + std::to_string(h) + " x " + std::to_string(w));
        list_once(pkg.reference_set.file, "reference_set");
        verify_file(dir, pkg.reference_set.file, pkg.reference_set.sha256, pkg.reference_set.bytes, "reference_set", false);
    }
    // Nothing outside the checksums may change an answer: an unlisted weights-like file refuses the package.
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
        const std::string name = entry.path().filename().string();
        std::string ext = entry.path().extension().string();
        std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        if (!listed.count(name) && weight_suffixes().count(ext))
            fail(dir.string() + ": " + name + " is in the package but not listed in model.json (no checksum): a weights "
                 "file outside the checksums is never used; remove it or list it");
    }
    if (ec) fail(dir.string() + ": cannot list the package (" + ec.message() + ")");
    return pkg;
}

}  // namespace cxr
