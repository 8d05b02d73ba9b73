// Internal: cxr_edge.preprocess reimplemented. Raw pixels -> float 0..1 (cxr_edge.decode.from_array),
// Pillow's antialiased bilinear resample of a float32 ('F') image from a source box, then
// (x - mean) * (1 / std) in float32, replicated over the channels.
#pragma once

#include <cstddef>
#include <vector>

#include "cxr_edge.h"

namespace cxr {

struct PreprocessSpec {
    int size = 224;
    bool shorter_side_crop = false;  // false: "stretch"
    int resize_size = 0;             // shorter_side_crop only
    int channels = 3;
    std::vector<double> mean{0.485, 0.456, 0.406};
    std::vector<double> std{0.229, 0.224, 0.225};
    double reducing_gap = 0.0;       // 0: absent (v1). >= 1: Pillow resize(reducing_gap=...) (v2)

    std::size_t tensor_size() const { return static_cast<std::size_t>(channels) * size * size; }
};

// Checks an image description; throws cxr::Error(CXR_E_INVALID_ARGUMENT) naming the problem.
// `what` prefixes the message (e.g. "image 3").
void validate_image(const cxr_image* image, const char* what);

// Source box (x0, y0, x1, y1) Pillow resamples from: cxr_edge.preprocess.resize_box, with the
// float32 rounding Pillow's argument parsing applies.
void resize_box(int height, int width, const PreprocessSpec& spec, float box[4]);

// The same box in double precision, as Python computes it (Pillow's reducing_gap arithmetic uses it).
void resize_box(int height, int width, const PreprocessSpec& spec, double box[4]);

// Pillow ImagingResample (bilinear, 'F' mode) of the image's 0..1 values to out_w x out_h.
// `out` receives out_w * out_h floats.
void resample(const cxr_image& image, int out_w, int out_h, const float box[4], float* out);

// Image.resize(size, BILINEAR, box, reducing_gap=gap): an integer box average of the image (by
// int(scale / gap) per axis, over the box widened by the filter's support), then the resample
// above from the reduced image. Pillow's Image.resize in Python, step by step.
void resample_reduced(const cxr_image& image, int out_w, int out_h, const double box[4], double gap, float* out);

// The model input for one validated image: spec.tensor_size() floats into `out`.
void preprocess(const cxr_image& image, const PreprocessSpec& spec, float* out);

}  // namespace cxr
