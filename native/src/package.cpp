// model.json reader. Mirrors ModelPackage.read / PreprocessSpec in cxr_edge (the one source of
// truth for the format): a package the Python runtime refuses is refused here with the same reason.
#include "package.hpp"

#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common.hpp"

namespace cxr {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int kSchemaVersion = 1;

[[noreturn]] void fail(const std::string& msg) { throw Error(CXR_E_PACKAGE, msg); }

bool is_int(const json& v) { return v.is_number_integer() || v.is_number_unsigned(); }

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
    static const std::set<std::string> known{"size", "resize", "resize_size", "interpolation", "channels", "mean", "std"};
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
    for (double v : s.std)
        if (!(v > 0)) fail(bad + "std must be positive");
    if (d.contains("resize_size") && !d["resize_size"].is_null()) {
        if (!is_int(d["resize_size"]) || d["resize_size"].get<long long>() < 1 || d["resize_size"].get<long long>() > 65536)
            fail(bad + "resize_size must be an integer");
        s.resize_size = d["resize_size"].get<int>();
    }
    if (s.shorter_side_crop && s.resize_size < s.size) fail(bad + "shorter_side_crop needs resize_size >= size");
    return s;
}

Artifact artifact_from_json(const json& a, std::size_t i, const std::string& where) {
    static const std::set<std::string> known{"file", "sha256", "bytes", "format", "precision",
                                             "outputs", "parity", "gate", "extra"};
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
    if (a.contains("sha256")) {
        if (!a["sha256"].is_string()) fail(bad + "'sha256' must be a string");
        art.sha256 = a["sha256"].get<std::string>();
    }
    if (a.contains("bytes")) {
        if (!is_int(a["bytes"]) || a["bytes"].get<long long>() < 0) fail(bad + "'bytes' must be a non-negative integer");
        art.bytes = a["bytes"].get<std::int64_t>();
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
            // Only an explicit true passes: anything else (missing, null, a string) is a failed gate.
            art.gate_passed[it.key()] =
                rec.is_object() && rec.contains("passed") && rec["passed"].is_boolean() && rec["passed"].get<bool>();
        }
    }
    return art;
}

std::string read_text(const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    if (!f) fail(p.string() + ": cannot be read");
    std::ostringstream ss;
    ss << f.rdbuf();
    if (f.bad()) fail(p.string() + ": read error");
    return ss.str();
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

Package read_package(const fs::path& dir) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) fail(dir.string() + ": model package directory not found");
    const fs::path meta_path = dir / "model.json";
    if (!fs::is_regular_file(meta_path, ec)) fail(dir.string() + ": no model.json in the model package");
    const std::string where = meta_path.string();

    json meta;
    try {
        meta = json::parse(read_text(meta_path));
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

    std::size_t i = 0;
    for (const auto& a : meta["artifacts"]) {
        Artifact art = artifact_from_json(a, i++, where);
        const fs::path p = dir / art.file;
        if (!fs::is_regular_file(p, ec))
            fail(dir.string() + ": artifact " + art.file + " listed in model.json is missing");
        const auto size = fs::file_size(p, ec);
        if (ec) fail(dir.string() + ": artifact " + art.file + " cannot be read (" + ec.message() + ")");
        // A cheap stand-in for the checksum the Python reader verifies: catches truncated copies.
        if (art.bytes > 0 && static_cast<std::int64_t>(size) != art.bytes)
            fail(dir.string() + ": artifact " + art.file + " has " + std::to_string(size) + " bytes, model.json says " +
                 std::to_string(art.bytes) + ": corrupted or replaced");
        pkg.artifacts.push_back(std::move(art));
    }
    return pkg;
}

}  // namespace cxr
