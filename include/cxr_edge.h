/*
 * cxr_edge.h - C API of the cxr-edge native SDK.
 *
 * Opens a cxr-edge model package (a directory holding model.json and its artifacts), runs the
 * package's own preprocessing on raw grayscale pixels and classifies them with OpenVINO (or
 * TensorRT where the library was built with it). The preprocessing reproduces the Python runtime
 * (cxr_edge.preprocess) to within 1e-5 per tensor element, so both give the same probabilities.
 *
 * Research software, not a medical device: not for diagnostic use.
 *
 * Conventions
 *  - Every function that can fail returns a cxr_status; CXR_OK is 0. No C++ exception crosses
 *    this boundary. After any call, cxr_last_error() tells what went wrong on the calling thread.
 *  - A cxr_model may be used from several threads at once (classify and query calls); only
 *    cxr_close must not race with other calls on the same model.
 *  - Strings returned through `const char **` belong to the model and stay valid until
 *    cxr_close. Nothing returned needs freeing except the model itself.
 *  - ABI: structs that may grow carry struct_size as their first member; fill them with the
 *    matching *_init function. Enumerations only ever gain values; their *_MAX_ENUM members are
 *    not values but pin them to 32 bits, so a value from a newer header is still representable.
 */
#ifndef CXR_EDGE_H
#define CXR_EDGE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(CXR_EDGE_BUILDING)
#    define CXR_EDGE_API __declspec(dllexport)
#  else
#    define CXR_EDGE_API __declspec(dllimport)
#  endif
#else
#  define CXR_EDGE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define CXR_EDGE_VERSION_MAJOR 0
#define CXR_EDGE_VERSION_MINOR 1
#define CXR_EDGE_VERSION_PATCH 0
/* Bumped only when this header changes incompatibly. */
#define CXR_EDGE_ABI_VERSION 1

typedef enum cxr_status {
    CXR_OK = 0,
    CXR_E_INVALID_ARGUMENT = 1, /* null pointer, zero size, bad pixel type or bit depth, stride too small */
    CXR_E_PACKAGE = 2,          /* package directory, model.json or a listed artifact missing or malformed */
    CXR_E_UNAVAILABLE = 3,      /* requested backend/precision not possible: no artifact, parity gate not
                                   passed, CPU lacks the precision, backend not built in */
    CXR_E_BACKEND = 4,          /* the inference runtime failed to load, compile or run the model */
    CXR_E_BUFFER_TOO_SMALL = 5, /* output capacity smaller than needed */
    CXR_E_OUT_OF_MEMORY = 6,
    CXR_E_INTERNAL = 7,
    CXR_STATUS_MAX_ENUM = 0x7fffffff /* keeps the type 32-bit and any int32 value representable */
} cxr_status;

typedef enum cxr_pixel_type {
    CXR_PIXEL_U8 = 1,  /* one byte per sample, 0..255 */
    CXR_PIXEL_U16 = 2, /* two bytes per sample, host byte order, scaled by bits_stored */
    CXR_PIXEL_MAX_ENUM = 0x7fffffff
} cxr_pixel_type;

/* One grayscale image as stored by a detector or decoder. The SDK only reads it. */
typedef struct cxr_image {
    const void *pixels;   /* first sample of the first row */
    uint32_t width;       /* samples per row, >= 2 */
    uint32_t height;      /* rows, >= 2 */
    size_t row_stride;    /* bytes from one row's start to the next; 0 = width * bytes per sample */
    int32_t pixel_type;   /* a cxr_pixel_type */
    uint32_t bits_stored; /* U16: significant bits, 1..16 (12 for a 12-bit detector); values above
                             2^bits_stored - 1 count as white. U8: 0 or 8 */
    int32_t monochrome1;  /* nonzero: 0 is white (DICOM MONOCHROME1); inverted before anything else */
} cxr_image;

/* Flags for cxr_options.flags */
#define CXR_FLAG_IGNORE_GATE 0x1u /* run an artifact even if model.json says it failed its parity gate */
#define CXR_FLAG_THROUGHPUT 0x2u  /* OpenVINO THROUGHPUT mode (many concurrent callers); default LATENCY */
#define CXR_FLAG_VERIFY 0x4u      /* verify on this device, before first use, a combination whose export verdict
                                     does not carry over (bf16/fp16, every TensorRT engine): run it on the
                                     package's reference set with the tolerances of cxr_edge/formats.py and skip
                                     it, like a failed gate, when it fails. Such combinations need this flag (or
                                     CXR_FLAG_IGNORE_GATE) to be chosen at all. Verdicts are cached, see cxr_verify */

typedef struct cxr_options {
    uint32_t struct_size;  /* sizeof(cxr_options): set by cxr_options_init */
    const char *backend;   /* "auto" (or NULL), "openvino", "tensorrt" */
    const char *precision; /* "auto" (or NULL), "fp32", "bf16", "fp16", "int8". fp32/bf16/fp16 run
                              model.onnx with that inference precision set explicitly; int8 runs
                              model.int8.onnx. "auto": the fastest one whose artifact passed its gate */
    const char *device;    /* OpenVINO device name; NULL: "CPU" */
    int32_t num_threads;   /* 0: the runtime decides */
    uint32_t flags;        /* CXR_FLAG_* */
    const char *cache_dir; /* compiled-model cache (OpenVINO cache_dir, TensorRT engines); NULL: none for
                              OpenVINO, $CXR_EDGE_CACHE or ~/.cache/cxr-edge for TensorRT */
} cxr_options;

typedef enum cxr_property {
    CXR_PROP_NAME = 1,                /* package name from model.json */
    CXR_PROP_BACKEND = 2,             /* "openvino" or "tensorrt" */
    CXR_PROP_PRECISION = 3,           /* the run precision chosen: "fp32", "bf16", "fp16", "int8" */
    CXR_PROP_ARTIFACT = 4,            /* artifact file name inside the package */
    CXR_PROP_INFERENCE_PRECISION = 5, /* what the runtime reports it computes in, e.g. "f32" */
    CXR_PROP_NORMAL_CLASS = 6,        /* the "no disease" class; "" when the package names none */
    CXR_PROP_DESCRIPTION = 7,         /* one line for logs */
    CXR_PROP_VERIFICATION = 8,        /* the last verification of this model ("" before any): n, agreement,
                                         lower bound, max |dp|, passed or why not */
    CXR_PROP_MAX_ENUM = 0x7fffffff
} cxr_property;

typedef struct cxr_model cxr_model;

/* "0.1.0" */
CXR_EDGE_API const char *cxr_version(void);

/* Message of the last call made on this thread; "" when it succeeded. Valid until the next call. */
CXR_EDGE_API const char *cxr_last_error(void);

/* A short constant name for a status code, e.g. "CXR_E_PACKAGE". */
CXR_EDGE_API const char *cxr_status_name(cxr_status status);

CXR_EDGE_API void cxr_options_init(cxr_options *options);

/* Open a model package directory. options may be NULL (all defaults). On failure *out_model is NULL. */
CXR_EDGE_API cxr_status cxr_open(const char *package_dir, const cxr_options *options, cxr_model **out_model);

/* NULL is accepted and ignored. */
CXR_EDGE_API void cxr_close(cxr_model *model);

CXR_EDGE_API cxr_status cxr_num_classes(const cxr_model *model, size_t *out_count);

/* Class names in model output order: probabilities come in this order. */
CXR_EDGE_API cxr_status cxr_class_name(const cxr_model *model, size_t index, const char **out_name);

CXR_EDGE_API cxr_status cxr_get_property(const cxr_model *model, cxr_property property, const char **out_value);

/* Model input tensor shape: channels x height x width (the batch dimension is free). */
CXR_EDGE_API cxr_status cxr_input_shape(const cxr_model *model, uint32_t *channels, uint32_t *height, uint32_t *width);

/* The model input for one image (channels * height * width floats, row-major), exactly what
 * classification feeds the network. tensor_capacity is in floats. */
CXR_EDGE_API cxr_status cxr_preprocess(const cxr_model *model, const cxr_image *image, float *tensor,
                                       size_t tensor_capacity);

/* Classify one image: writes num_classes probabilities (softmax) into probabilities.
 * capacity is in floats. */
CXR_EDGE_API cxr_status cxr_classify(cxr_model *model, const cxr_image *image, float *probabilities,
                                     size_t capacity);

/* Classify count images in batches: writes count * num_classes probabilities, image-major. Every image
 * is validated before any inference runs; a bad one fails the call and names its index. */
CXR_EDGE_API cxr_status cxr_classify_batch(cxr_model *model, const cxr_image *images, size_t count,
                                           float *probabilities, size_t capacity);

/* Result of cxr_verify. Fill with cxr_verify_result_init. */
typedef struct cxr_verify_result {
    uint32_t struct_size;  /* sizeof(cxr_verify_result): set by cxr_verify_result_init */
    uint32_t n;            /* reference images compared */
    double agreement;      /* top-1 agreement with the torch fp32 reference, fraction */
    double lower_bound;    /* its Wilson 95 % lower confidence bound */
    double max_abs_dp;     /* max |probability difference| over all images and classes */
    double p99_abs_dp;     /* 99th percentile over images of each image's max |dp| */
    int32_t passed;        /* 1: within the tolerances of the model's precision (cxr_edge/formats.py) */
    int32_t from_cache;    /* 1: read from the verdict cache instead of measured now */
} cxr_verify_result;

CXR_EDGE_API void cxr_verify_result_init(cxr_verify_result *result);

/* Verify the open model on this device: run the package's reference set (reference.u16, listed in
 * model.json) through the chosen backend/precision and compare with the torch fp32 probabilities stored
 * with it. A failed verification still returns CXR_OK, with passed = 0; CXR_PROP_VERIFICATION says why.
 * use_cache nonzero: reuse a verdict cached for the same artifact and reference checksums, backend,
 * precision, runtime version and device, and cache a new one. The cache is
 * <options.cache_dir or $CXR_EDGE_CACHE or $XDG_CACHE_HOME/cxr-edge or ~/.cache/cxr-edge>/native-verdicts/,
 * one small text file per key, written atomically; an unreadable file is measured again.
 * CXR_E_UNAVAILABLE: the package has no reference set. */
CXR_EDGE_API cxr_status cxr_verify(cxr_model *model, int32_t use_cache, cxr_verify_result *result);

#ifdef __cplusplus
}
#endif

#endif /* CXR_EDGE_H */
