// Preprocessing that matches cxr_edge.preprocess.preprocess(cxr_edge.decode.from_array(pixels)).
//
// The resampler follows Pillow's src/libImaging/Resample.c for 32-bit float images step by step
// (coefficients and sums in double, results stored as float, horizontal pass first over only the
// rows the vertical pass reads) and _imaging.c's shortcut that turns an integer box of the output
// size into a crop. Matching the reference operation for operation, rather than approximately,
// is what keeps the C++ and Python tensors within ~1e-6 instead of "close".
//
// This file is compiled with -ffp-contract=off: fusing a*b+c into one FMA rounds differently
// from the Pillow build the Python side uses.
#include "preprocess.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "common.hpp"

namespace cxr {
namespace {

std::size_t bytes_per_sample(const cxr_image& im) { return im.pixel_type == CXR_PIXEL_U16 ? 2 : 1; }

std::size_t row_stride(const cxr_image& im) {
    return im.row_stride ? im.row_stride : static_cast<std::size_t>(im.width) * bytes_per_sample(im);
}

// One source row as from_array's float32 values: uint8 v/255, uint16 v/(2^bits-1) clipped to 0..1,
// then 1 - v for MONOCHROME1. The divisions are float32 like numpy's, not reciprocal multiplies.
void convert_row(const cxr_image& im, int y, float* dst) {
    const auto* row = static_cast<const unsigned char*>(im.pixels) + static_cast<std::size_t>(y) * row_stride(im);
    const int w = static_cast<int>(im.width);
    if (im.pixel_type == CXR_PIXEL_U8) {
        for (int x = 0; x < w; ++x) dst[x] = static_cast<float>(row[x]) / 255.0f;
    } else {
        const float maxv = static_cast<float>((1u << im.bits_stored) - 1u);
        for (int x = 0; x < w; ++x) {
            std::uint16_t v;
            std::memcpy(&v, row + 2 * static_cast<std::size_t>(x), 2);  // rows need not be 2-byte aligned
            dst[x] = std::min(std::max(static_cast<float>(v) / maxv, 0.0f), 1.0f);
        }
    }
    if (im.monochrome1) {
        for (int x = 0; x < w; ++x) dst[x] = 1.0f - dst[x];
    }
}

struct Coeffs {
    int ksize = 0;
    std::vector<int> bounds;  // per output: first input index, number of inputs
    std::vector<double> kk;   // per output: ksize normalised weights
};

double bilinear_filter(double x) {
    if (x < 0.0) x = -x;
    if (x < 1.0) return 1.0 - x;
    return 0.0;
}

// Resample.c precompute_coeffs with the BILINEAR filter (support 1.0).
Coeffs precompute_coeffs(int in_size, float in0, float in1, int out_size) {
    Coeffs c;
    // (in1 - in0) is a float subtraction in Pillow (the box is float[4]); only then widened.
    const float extent = in1 - in0;
    const double scale = static_cast<double>(extent) / out_size;
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = 1.0 * filterscale;
    c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    c.kk.assign(static_cast<std::size_t>(out_size) * c.ksize, 0.0);
    c.bounds.assign(static_cast<std::size_t>(out_size) * 2, 0);
    for (int xx = 0; xx < out_size; ++xx) {
        const double center = static_cast<double>(in0) + (xx + 0.5) * scale;
        double ww = 0.0;
        const double ss = 1.0 / filterscale;
        int xmin = static_cast<int>(center - support + 0.5);  // truncation toward zero, as in C
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double* k = &c.kk[static_cast<std::size_t>(xx) * c.ksize];
        for (int x = 0; x < xmax; ++x) {
            const double w = bilinear_filter((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (int x = 0; x < xmax; ++x) {
            if (ww != 0.0) k[x] /= ww;
        }
        c.bounds[2 * xx] = xmin;
        c.bounds[2 * xx + 1] = xmax;
    }
    return c;
}

// Python's round() for the halves it meets here: round half to even, independent of the FPU mode.
long round_half_even(double x) {
    double r = std::floor(x);
    const double d = x - r;
    if (d > 0.5 || (d == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
    return static_cast<long>(r);
}

long floor_div(long a, long b) {
    long q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
    return q;
}

}  // namespace

void validate_image(const cxr_image* image, const char* what) {
    const std::string p = std::string(what) + ": ";
    if (!image) throw Error(CXR_E_INVALID_ARGUMENT, p + "image is NULL");
    if (!image->pixels) throw Error(CXR_E_INVALID_ARGUMENT, p + "pixels is NULL");
    if (image->pixel_type != CXR_PIXEL_U8 && image->pixel_type != CXR_PIXEL_U16)
        throw Error(CXR_E_INVALID_ARGUMENT,
                    p + "pixel_type " + std::to_string(image->pixel_type) + " unknown (CXR_PIXEL_U8 or CXR_PIXEL_U16)");
    if (image->width < 2 || image->height < 2)
        throw Error(CXR_E_INVALID_ARGUMENT, p + "image of " + std::to_string(image->width) + "x" +
                                                std::to_string(image->height) + " pixels is too small to classify");
    // Far beyond any radiograph, and keeps every index computation inside int.
    if (image->width > (1u << 20) || image->height > (1u << 20))
        throw Error(CXR_E_INVALID_ARGUMENT, p + "width and height must be at most 1048576");
    if (image->pixel_type == CXR_PIXEL_U8 && image->bits_stored != 0 && image->bits_stored != 8)
        throw Error(CXR_E_INVALID_ARGUMENT,
                    p + "bits_stored must be 0 or 8 for CXR_PIXEL_U8, got " + std::to_string(image->bits_stored));
    if (image->pixel_type == CXR_PIXEL_U16 && (image->bits_stored < 1 || image->bits_stored > 16))
        throw Error(CXR_E_INVALID_ARGUMENT,
                    p + "CXR_PIXEL_U16 needs bits_stored 1..16 (e.g. 12 for a 12-bit detector), got " +
                        std::to_string(image->bits_stored));
    const std::size_t min_stride = static_cast<std::size_t>(image->width) * bytes_per_sample(*image);
    if (image->row_stride != 0 && image->row_stride < min_stride)
        throw Error(CXR_E_INVALID_ARGUMENT, p + "row_stride " + std::to_string(image->row_stride) +
                                                " is smaller than a row (" + std::to_string(min_stride) + " bytes)");
}

void resize_box(int height, int width, const PreprocessSpec& spec, float box[4]) {
    double d[4];
    resize_box(height, width, spec, d);
    // Python computes the box in double; Pillow's resize() parses it as C floats.
    for (int i = 0; i < 4; ++i) box[i] = static_cast<float>(d[i]);
}

void resize_box(int height, int width, const PreprocessSpec& spec, double box[4]) {
    if (!spec.shorter_side_crop) {
        box[0] = 0.0;
        box[1] = 0.0;
        box[2] = static_cast<double>(width);
        box[3] = static_cast<double>(height);
        return;
    }
    const double scale = static_cast<double>(spec.resize_size) / std::min(height, width);
    const long new_w = round_half_even(width * scale);
    const long new_h = round_half_even(height * scale);
    const long left = floor_div(new_w - spec.size, 2);
    const long top = floor_div(new_h - spec.size, 2);
    const double sx = static_cast<double>(width) / new_w;
    const double sy = static_cast<double>(height) / new_h;
    box[0] = left * sx;
    box[1] = top * sy;
    box[2] = (left + spec.size) * sx;
    box[3] = (top + spec.size) * sy;
}

namespace {

// The resampler over any source of float rows: get_row(y, dst) writes row y's in_w values.
template <class RowFn>
void resample_rows(int in_w, int in_h, RowFn&& get_row, int out_w, int out_h, const float box[4], float* out) {
    std::vector<float> row(static_cast<std::size_t>(in_w));

    // _imaging.c: an integer box exactly the output size is a crop, not a resample.
    if (box[0] - static_cast<int>(box[0]) == 0 && box[2] - box[0] == out_w && box[1] - static_cast<int>(box[1]) == 0 &&
        box[3] - box[1] == out_h) {
        const int x0 = static_cast<int>(box[0]);
        const int y0 = static_cast<int>(box[1]);
        for (int y = 0; y < out_h; ++y) {
            get_row(y0 + y, row.data());
            std::copy(row.begin() + x0, row.begin() + x0 + out_w, out + static_cast<std::size_t>(y) * out_w);
        }
        return;
    }

    const bool need_h = out_w != in_w || box[0] != 0 || box[2] != out_w;
    const bool need_v = out_h != in_h || box[1] != 0 || box[3] != out_h;

    Coeffs vert = precompute_coeffs(in_h, box[1], box[3], out_h);
    const int y_first = vert.bounds[0];
    const int y_last = vert.bounds[2 * out_h - 2] + vert.bounds[2 * out_h - 1];
    const int rows = std::max(y_last - y_first, 0);
    for (int i = 0; i < out_h; ++i) vert.bounds[2 * i] -= y_first;

    // Horizontal pass over the rows the vertical pass reads; without one, those rows as they are.
    const int tmp_w = need_h ? out_w : in_w;
    std::vector<float> tmp(static_cast<std::size_t>(tmp_w) * rows);
    Coeffs horiz;
    if (need_h) horiz = precompute_coeffs(in_w, box[0], box[2], out_w);
    for (int y = 0; y < rows; ++y) {
        float* dst = &tmp[static_cast<std::size_t>(y) * tmp_w];
        if (!need_h) {
            get_row(y + y_first, dst);
            continue;
        }
        get_row(y + y_first, row.data());
        for (int xx = 0; xx < out_w; ++xx) {
            const int xmin = horiz.bounds[2 * xx];
            const int xmax = horiz.bounds[2 * xx + 1];
            const double* k = &horiz.kk[static_cast<std::size_t>(xx) * horiz.ksize];
            double ss = 0.0;
            for (int x = 0; x < xmax; ++x) ss += row[x + xmin] * k[x];
            dst[xx] = static_cast<float>(ss);
        }
    }

    if (!need_v) {
        std::copy(tmp.begin(), tmp.begin() + static_cast<std::ptrdiff_t>(out_w) * out_h, out);
        return;
    }
    // Vertical pass. Accumulating a whole output row at once reads tmp row by row (cache
    // friendly) while each output still sums its terms in Pillow's order, starting from 0.0.
    std::vector<double> acc(static_cast<std::size_t>(out_w));
    for (int yy = 0; yy < out_h; ++yy) {
        const int ymin = vert.bounds[2 * yy];
        const int ymax = vert.bounds[2 * yy + 1];
        const double* k = &vert.kk[static_cast<std::size_t>(yy) * vert.ksize];
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int y = 0; y < ymax; ++y) {
            const float* src = &tmp[static_cast<std::size_t>(y + ymin) * tmp_w];
            const double w = k[y];
            for (int xx = 0; xx < out_w; ++xx) acc[xx] += src[xx] * w;
        }
        float* dst = out + static_cast<std::size_t>(yy) * out_w;
        for (int xx = 0; xx < out_w; ++xx) dst[xx] = static_cast<float>(acc[xx]);
    }
}

}  // namespace

void resample(const cxr_image& im, int out_w, int out_h, const float box[4], float* out) {
    resample_rows(static_cast<int>(im.width), static_cast<int>(im.height),
                  [&im](int y, float* dst) { convert_row(im, y, dst); }, out_w, out_h, box, out);
}

void resample_reduced(const cxr_image& im, int out_w, int out_h, const double box[4], double gap, float* out) {
    const int in_w = static_cast<int>(im.width);
    const int in_h = static_cast<int>(im.height);
    // Image.resize: factor = int(box extent / size / reducing_gap) or 1, per axis
    int fx = static_cast<int>((box[2] - box[0]) / out_w / gap);
    int fy = static_cast<int>((box[3] - box[1]) / out_h / gap);
    if (fx < 1) fx = 1;
    if (fy < 1) fy = 1;
    if (fx == 1 && fy == 1) {
        const float fbox[4] = {static_cast<float>(box[0]), static_cast<float>(box[1]), static_cast<float>(box[2]),
                               static_cast<float>(box[3])};
        resample(im, out_w, out_h, fbox, out);
        return;
    }
    // Image._get_safe_box: the box widened by the bilinear support (1.0 - 0.5) x scale; int()
    // truncates toward zero as Python does.
    const double sx = 0.5 * ((box[2] - box[0]) / out_w);
    const double sy = 0.5 * ((box[3] - box[1]) / out_h);
    const int rb0 = std::max(0, static_cast<int>(box[0] - sx));
    const int rb1 = std::max(0, static_cast<int>(box[1] - sy));
    const int rb2 = std::min(in_w, static_cast<int>(std::ceil(box[2] + sx)));
    const int rb3 = std::min(in_h, static_cast<int>(std::ceil(box[3] + sy)));
    // ImagingReduce over that box: the mean of each fx x fy block; blocks cut by the box's right
    // or bottom edge average the pixels they have.
    const int rw = (rb2 - rb0 + fx - 1) / fx;
    const int rh = (rb3 - rb1 + fy - 1) / fy;
    std::vector<float> reduced(static_cast<std::size_t>(rw) * rh);
    std::vector<float> row(static_cast<std::size_t>(in_w));
    std::vector<double> acc(static_cast<std::size_t>(rw));
    for (int y = 0; y < rh; ++y) {
        const int y0 = rb1 + y * fy;
        const int y1 = std::min(y0 + fy, rb3);
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int yy = y0; yy < y1; ++yy) {
            convert_row(im, yy, row.data());
            for (int x = 0; x < rw; ++x) {
                const int x0 = rb0 + x * fx;
                const int x1 = std::min(x0 + fx, rb2);
                double s = 0.0;
                for (int xx = x0; xx < x1; ++xx) s += row[xx];
                acc[x] += s;
            }
        }
        float* dst = &reduced[static_cast<std::size_t>(y) * rw];
        for (int x = 0; x < rw; ++x) {
            const int n = (std::min(rb0 + (x + 1) * fx, rb2) - (rb0 + x * fx)) * (y1 - y0);
            dst[x] = static_cast<float>(acc[x] / n);
        }
    }
    // the box in the reduced image's coordinates (double in Python, parsed as floats by Pillow)
    const float nbox[4] = {static_cast<float>((box[0] - rb0) / fx), static_cast<float>((box[1] - rb1) / fy),
                           static_cast<float>((box[2] - rb0) / fx), static_cast<float>((box[3] - rb1) / fy)};
    resample_rows(
        rw, rh,
        [&reduced, rw](int y, float* dst) {
            std::copy(reduced.begin() + static_cast<std::ptrdiff_t>(y) * rw,
                      reduced.begin() + static_cast<std::ptrdiff_t>(y + 1) * rw, dst);
        },
        out_w, out_h, nbox, out);
}

void preprocess(const cxr_image& image, const PreprocessSpec& spec, float* out) {
    const std::size_t plane = static_cast<std::size_t>(spec.size) * spec.size;
    std::vector<float> resized(plane);
    if (spec.reducing_gap >= 1.0) {
        double box[4];
        resize_box(static_cast<int>(image.height), static_cast<int>(image.width), spec, box);
        resample_reduced(image, spec.size, spec.size, box, spec.reducing_gap, resized.data());
    } else {
        float box[4];
        resize_box(static_cast<int>(image.height), static_cast<int>(image.width), spec, box);
        resample(image, spec.size, spec.size, box, resized.data());
    }
    for (int c = 0; c < spec.channels; ++c) {
        // normalise(): float32 mean, float32(1 / float64 std), float32 arithmetic
        const float mean = static_cast<float>(spec.mean[c]);
        const float inv_std = static_cast<float>(1.0 / spec.std[c]);
        float* dst = out + c * plane;
        for (std::size_t i = 0; i < plane; ++i) dst[i] = (resized[i] - mean) * inv_std;
    }
}

}  // namespace cxr
