/*
 * cxr-edge-classify: classify grayscale radiographs stored as binary PGM (P5, 8- or 16-bit) with a
 * cxr-edge model package, through the C API only. Written in C to show the header is plain C.
 *
 *   cxr-edge-classify [--precision P] [--backend B] [--monochrome1] [--bits N] [--json] PACKAGE IMAGE.pgm...
 *
 * PGM because it is raw pixels with a three-field header: the SDK takes decoded pixels, and a
 * sample that needs no image library keeps the build to OpenVINO alone. A 16-bit PGM's maxval gives
 * the stored bit depth (4095 -> 12 bits) unless --bits says otherwise.
 *
 * Research software, not a medical device: not for diagnostic use.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cxr_edge.h"

typedef struct {
    unsigned char *data;
    unsigned width, height, maxval;
} pgm;

static int pgm_token(FILE *f, unsigned *out) {
    int c = fgetc(f);
    for (;;) { /* whitespace and '#' comments may separate header fields */
        while (c != EOF && isspace(c)) c = fgetc(f);
        if (c != '#') break;
        while (c != EOF && c != '\n') c = fgetc(f);
    }
    if (c == EOF || !isdigit(c)) return 0;
    unsigned long v = 0;
    while (c != EOF && isdigit(c)) {
        v = v * 10 + (unsigned long)(c - '0');
        if (v > 1000000UL) return 0;
        c = fgetc(f);
    }
    *out = (unsigned)v; /* c is the single whitespace byte that ends the header field */
    return c != EOF && isspace(c);
}

/* 0 on success; on failure a message in err. 16-bit samples are converted to host order. */
static int pgm_read(const char *path, pgm *img, char *err, size_t errlen) {
    memset(img, 0, sizeof *img);
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open: %s", strerror(errno));
        return -1;
    }
    char magic[2];
    if (fread(magic, 1, 2, f) != 2 || magic[0] != 'P' || magic[1] != '5' || !pgm_token(f, &img->width) ||
        !pgm_token(f, &img->height) || !pgm_token(f, &img->maxval) || img->maxval == 0 || img->maxval > 65535 ||
        img->width == 0 || img->height == 0) {
        snprintf(err, errlen, "not a binary PGM (P5) file");
        fclose(f);
        return -1;
    }
    size_t bps = img->maxval > 255 ? 2 : 1;
    size_t n = (size_t)img->width * img->height * bps;
    img->data = malloc(n);
    if (!img->data) {
        snprintf(err, errlen, "out of memory for %ux%u pixels", img->width, img->height);
        fclose(f);
        return -1;
    }
    if (fread(img->data, 1, n, f) != n) {
        snprintf(err, errlen, "truncated: fewer than %ux%u pixels", img->width, img->height);
        free(img->data);
        img->data = NULL;
        fclose(f);
        return -1;
    }
    fclose(f);
    if (bps == 2) { /* PGM stores 16-bit samples big-endian; the SDK takes host order */
        for (size_t i = 0; i < n; i += 2) {
            unsigned short v = (unsigned short)((img->data[i] << 8) | img->data[i + 1]);
            memcpy(img->data + i, &v, 2);
        }
    }
    return 0;
}

static unsigned bits_for_maxval(unsigned maxval) {
    unsigned bits = 0;
    while (bits < 16 && ((1u << bits) - 1u) < maxval) bits++;
    return ((1u << bits) - 1u) == maxval ? bits : 0;
}

static void print_json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20) printf("\\u%04x", *s);
        else putchar(*s);
    }
    putchar('"');
}

static int usage(void) {
    fprintf(stderr, "usage: cxr-edge-classify [--precision auto|fp32|bf16|fp16|int8] [--backend auto|openvino|tensorrt]\n"
                    "                         [--monochrome1] [--bits N] [--json] PACKAGE IMAGE.pgm...\n");
    return 2;
}

int main(int argc, char **argv) {
    cxr_options opts;
    cxr_options_init(&opts);
    int monochrome1 = 0, json = 0;
    unsigned bits_override = 0;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (!strcmp(argv[i], "--precision") && i + 1 < argc) opts.precision = argv[++i];
        else if (!strcmp(argv[i], "--backend") && i + 1 < argc) opts.backend = argv[++i];
        else if (!strcmp(argv[i], "--bits") && i + 1 < argc) bits_override = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--monochrome1")) monochrome1 = 1;
        else if (!strcmp(argv[i], "--json")) json = 1;
        else return usage();
    }
    if (argc - i < 2) return usage();
    const char *package = argv[i++];

    cxr_model *model = NULL;
    cxr_status st = cxr_open(package, &opts, &model);
    if (st != CXR_OK) {
        fprintf(stderr, "cxr-edge-classify: %s: %s\n", cxr_status_name(st), cxr_last_error());
        return 1;
    }
    const char *desc = "";
    cxr_get_property(model, CXR_PROP_DESCRIPTION, &desc);
    fprintf(stderr, "model: %s\nResearch software, not a medical device: not for diagnostic use.\n", desc);

    size_t k = 0;
    cxr_num_classes(model, &k);
    float *probs = malloc(k * sizeof *probs);
    if (!probs) {
        cxr_close(model);
        return 1;
    }
    int failures = 0;
    for (; i < argc; i++) {
        char err[256];
        pgm img;
        if (pgm_read(argv[i], &img, err, sizeof err) != 0) {
            fprintf(stderr, "%s: %s\n", argv[i], err);
            failures++;
            continue;
        }
        cxr_image in = {0};
        in.pixels = img.data;
        in.width = img.width;
        in.height = img.height;
        in.row_stride = 0;
        in.pixel_type = img.maxval > 255 ? CXR_PIXEL_U16 : CXR_PIXEL_U8;
        in.bits_stored = img.maxval > 255 ? (bits_override ? bits_override : bits_for_maxval(img.maxval)) : 0;
        in.monochrome1 = monochrome1;
        if (img.maxval <= 255 && img.maxval != 255) {
            fprintf(stderr, "%s: 8-bit PGM with maxval %u: only 255 is supported\n", argv[i], img.maxval);
            free(img.data);
            failures++;
            continue;
        }
        st = cxr_classify(model, &in, probs, k);
        free(img.data);
        if (st != CXR_OK) {
            fprintf(stderr, "%s: %s: %s\n", argv[i], cxr_status_name(st), cxr_last_error());
            failures++;
            continue;
        }
        size_t best = 0;
        for (size_t c = 1; c < k; c++)
            if (probs[c] > probs[best]) best = c;
        const char *label = "";
        cxr_class_name(model, best, &label);
        if (json) {
            printf("{\"path\": ");
            print_json_string(argv[i]);
            printf(", \"label\": ");
            print_json_string(label);
            printf(", \"probabilities\": {");
            for (size_t c = 0; c < k; c++) {
                const char *name = "";
                cxr_class_name(model, c, &name);
                printf("%s", c ? ", " : "");
                print_json_string(name);
                printf(": %.9g", probs[c]);
            }
            printf("}}\n");
        } else {
            printf("%s: %s (%.4f)", argv[i], label, probs[best]);
            for (size_t c = 0; c < k; c++) {
                const char *name = "";
                cxr_class_name(model, c, &name);
                printf("  %s=%.4f", name, probs[c]);
            }
            printf("\n");
        }
    }
    free(probs);
    cxr_close(model);
    return failures ? 1 : 0;
}
