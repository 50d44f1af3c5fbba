/* Rows of GGUF blocks to float32, with gguf-py's float32 operations in its order (the scale
 * products first, then q * scale and - min as separate roundings), so the values are the bits
 * pipeload's torch dequantizers (quant/legacy.py, quant/kquants.py) give. Used for prompt
 * products through a float GEMM and by the tests, which check the layouts read here bit for bit
 * against those dequantizers.
 */
#include "pl.h"

void dequant_q8_0(const uint8_t *w, int64_t k, float *out) {
    for (int64_t b = 0; b < k / QK; b++, w += 34, out += QK) {
        float d = load_fp16(w);
        for (int j = 0; j < QK; j++) out[j] = (float)(int8_t)w[2 + j] * d;
    }
}

void dequant_q4_0(const uint8_t *w, int64_t k, float *out) {
    for (int64_t b = 0; b < k / QK; b++, w += 18, out += QK) {
        float d = load_fp16(w);
        for (int j = 0; j < 16; j++) {
            out[j] = (float)((w[2 + j] & 0x0F) - 8) * d;
            out[16 + j] = (float)((w[2 + j] >> 4) - 8) * d;
        }
    }
}

void dequant_q4_1(const uint8_t *w, int64_t k, float *out) {
    for (int64_t b = 0; b < k / QK; b++, w += 20, out += QK) {
        float d = load_fp16(w), m = load_fp16(w + 2);
        for (int j = 0; j < 16; j++) {
            out[j] = (float)(w[4 + j] & 0x0F) * d + m;
            out[16 + j] = (float)(w[4 + j] >> 4) * d + m;
        }
    }
}

/* the 32 five-bit quants of a Q5 block: low nibbles from qs, bit j of qh as 16 for quant j */
static void five_bits(const uint8_t *qh4, const uint8_t *qs, int q[32]) {
    uint32_t qh;
    memcpy(&qh, qh4, 4);
    for (int j = 0; j < 16; j++) {
        q[j] = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
        q[16 + j] = (qs[j] >> 4) | (((qh >> (16 + j)) & 1) << 4);
    }
}

void dequant_q5_0(const uint8_t *w, int64_t k, float *out) {
    int q[32];
    for (int64_t b = 0; b < k / QK; b++, w += 22, out += QK) {
        float d = load_fp16(w);
        five_bits(w + 2, w + 6, q);
        for (int j = 0; j < QK; j++) out[j] = (float)(q[j] - 16) * d;
    }
}

void dequant_q5_1(const uint8_t *w, int64_t k, float *out) {
    int q[32];
    for (int64_t b = 0; b < k / QK; b++, w += 24, out += QK) {
        float d = load_fp16(w), m = load_fp16(w + 2);
        five_bits(w + 4, w + 8, q);
        for (int j = 0; j < QK; j++) out[j] = (float)q[j] * d + m;
    }
}

/* Q2_K (84 bytes): scales[16] (low nibble scale, high nibble min, per 16 values), qs[64]
 * (value 128 h + 32 j + l is bits 2j of qs[32 h + l]), d, dmin. */
void dequant_q2_K(const uint8_t *w, int64_t k, float *out) {
    for (int64_t b = 0; b < k / QKK; b++, w += 84, out += QKK) {
        float d = load_fp16(w + 80), dmin = load_fp16(w + 82);
        for (int i = 0; i < QKK; i++) {
            int h = i / 128, j = (i / 32) % 4, l = i % 32, s = i / 16;
            float dl = d * (float)(w[s] & 0x0F), ml = dmin * (float)(w[s] >> 4);
            out[i] = dl * (float)((w[16 + 32 * h + l] >> (2 * j)) & 3) - ml;
        }
    }
}

/* Q3_K (110 bytes): hmask[32] (value 32 g + l has bit g of hmask[l]; set = no -4 offset),
 * qs[64] (low two bits, as Q2_K), 12 bytes of six-bit scales (q3k_scales), d. */
void dequant_q3_K(const uint8_t *w, int64_t k, float *out) {
    int8_t sc[16];
    for (int64_t b = 0; b < k / QKK; b++, w += 110, out += QKK) {
        float d = load_fp16(w + 108);
        q3k_scales(w + 96, sc);
        for (int i = 0; i < QKK; i++) {
            int h = i / 128, j = (i / 32) % 4, l = i % 32, g = i / 32;
            int q = ((w[32 + 32 * h + l] >> (2 * j)) & 3) | (((w[l] >> g) & 1) << 2);
            out[i] = (d * (float)sc[i / 16]) * (float)(q - 4);
        }
    }
}

/* Q4_K (144 bytes): d, dmin, 12 bytes of scales/mins (kquant_scale_min), qs[128] (value
 * 64 c + l is the low nibble of qs[32 c + l], 64 c + 32 + l its high nibble), 8 sub-blocks of 32. */
void dequant_q4_K(const uint8_t *w, int64_t k, float *out) {
    uint8_t sc[8], mn[8];
    for (int64_t b = 0; b < k / QKK; b++, w += 144, out += QKK) {
        float d = load_fp16(w), dmin = load_fp16(w + 2);
        kquant_scale_min(w + 4, sc, mn);
        for (int i = 0; i < QKK; i++) {
            int c = i / 64, l = i % 32, s = i / 32;
            int q = (i % 64) < 32 ? (w[16 + 32 * c + l] & 0x0F) : (w[16 + 32 * c + l] >> 4);
            out[i] = (d * (float)sc[s]) * (float)q - dmin * (float)mn[s];
        }
    }
}

/* Q5_K (176 bytes): as Q4_K with qh[32] at 16 (value 32 s + l has bit s of qh[l] as 16), qs at 48. */
void dequant_q5_K(const uint8_t *w, int64_t k, float *out) {
    uint8_t sc[8], mn[8];
    for (int64_t b = 0; b < k / QKK; b++, w += 176, out += QKK) {
        float d = load_fp16(w), dmin = load_fp16(w + 2);
        kquant_scale_min(w + 4, sc, mn);
        for (int i = 0; i < QKK; i++) {
            int c = i / 64, l = i % 32, s = i / 32;
            int q = (i % 64) < 32 ? (w[48 + 32 * c + l] & 0x0F) : (w[48 + 32 * c + l] >> 4);
            q |= ((w[16 + l] >> s) & 1) << 4;
            out[i] = (d * (float)sc[s]) * (float)q - dmin * (float)mn[s];
        }
    }
}

/* Q6_K (210 bytes): ql[128], qh[64], int8 scales[16] (per 16 values), d. In half h (128 values),
 * value 32 j + l has the low nibble (j < 2) or high nibble (j >= 2) of ql[64 h + 32 (j % 2) + l]
 * and bits 2j of qh[32 h + l] as bits 4-5; minus 32. */
void dequant_q6_K(const uint8_t *w, int64_t k, float *out) {
    for (int64_t b = 0; b < k / QKK; b++, w += 210, out += QKK) {
        float d = load_fp16(w + 208);
        for (int i = 0; i < QKK; i++) {
            int h = i / 128, j = (i / 32) % 4, l = i % 32;
            int lo = (w[64 * h + 32 * (j % 2) + l] >> (4 * (j / 2))) & 0x0F;
            int hi = (w[128 + 32 * h + l] >> (2 * j)) & 3;
            out[i] = (d * (float)(int8_t)w[192 + i / 16]) * (float)((lo | (hi << 4)) - 32);
        }
    }
}

void dequant_f32(const uint8_t *w, int64_t k, float *out) { memcpy(out, w, (size_t)k * 4); }

void dequant_f16(const uint8_t *w, int64_t k, float *out) {
    for (int64_t i = 0; i < k; i++) out[i] = load_fp16(w + 2 * i);
}

void dequant_bf16(const uint8_t *w, int64_t k, float *out) {
    for (int64_t i = 0; i < k; i++) {
        uint16_t h;
        memcpy(&h, w + 2 * i, 2);
        out[i] = bf16_to_f32(h);
    }
}
