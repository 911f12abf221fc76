/* Decode attention straight out of the paged KV cache, and the cache store.
 *
 * One new token per sequence attends to its whole context; the keys and
 * values are read in place through the sequence's slot table (no gathered
 * copy of the context), once per (sequence, kv head) for all the query heads
 * that share them.
 *
 * SHAPES (B decodes, H query heads, Hkv kv heads, G = H / Hkv, S cache slots,
 *         dq / dv head sizes, Lmax = ldslots)
 *   q        [B, H, dq]     FP32; token stride q_ld, head stride q_hs
 *   K, V     cache operands: row (slot s, kv head g) at p + s * ld + g * hs,
 *            FP32 or BF16, dq (K) / dv (V) contiguous elements
 *   slots    [B, ldslots]   int64: slot of each context position
 *   context  [B]            int64: valid positions of each row, 1..ldslots
 *   out      [B, H, dv]     FP32, contiguous
 *
 * DEFINITION (b < B, h < H, j < context[b], g = h / G)
 *   s[j]      = scale * sum_d q[b][h][d] * K(slots[b][j], g)[d]
 *   out[b][h] = sum_j softmax(s)[j] * V(slots[b][j], g)
 *
 * REGULARITIES  B 1..64, context 1..32K+. G 1 (Mixtral MHA) .. 8 (Qwen3-30B:
 *   32 / 4), 16 (MLA absorbed: 128 heads / 1 latent, dq 576, dv 512).
 *   GQA cache [S, 2, Hkv, d]: K at +0, V at +Hkv d, ld 2 Hkv d, hs d.
 *   MLA cache [S, r + dr]: K = V = the row, ld r + dr, hs 0, dv = r (a BF16 row is
 *   widened once for both).
 *
 * PLAN  one attention reduction order per query for prefill and decode alike:
 *   a decode is attention_kernels.c's per-query arithmetic (key blocks of 64
 *   from key 0, BF16 dot products on AVX-512 and FP32 on AVX2 / generic, the
 *   same online-softmax steps) with its keys read through the slot table
 *   (attention_paged). A position's output is therefore bit-identical whether
 *   it is computed in a decode step, in any prefill chunk, beside any other
 *   requests or on any thread count (no key range is ever split across
 *   threads: items are (sequence, kv head, head group), the groups only when
 *   there are fewer pairs than threads, as MLA's one latent head). Slots and
 *   context are all checked before anything is read.
 *
 * KV STORE  rows k [N, Hkv, dq] and v [N, Hkv, dv] (FP32, given strides) are
 *   written to slots slot_mapping[N]; BF16 rounds to nearest even (NaN ->
 *   0xffff, as torch's conversion). All slots are checked before any write.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "thread_pool.h"
#include "expert_units.h"
#include "attention_kernels.c"      /* attention_paged: one included copy (include guard) */

/* A cache operand: row (slot s, kv head g) at p + s * ld + g * hs (the attention
 * kernel's operand, with slots for tokens). */
typedef att_operand kv_operand;

/* Bytes of workspace decode_attention needs (bounded by the threads, not by context). */
static int64_t decode_workspace_bytes(int B, int H, int Hkv, int dq, int dv, int nthreads) {
    return attention_paged_workspace_bytes(B, H, Hkv, dq, dv, nthreads);
}

/* out [B, H, dv] = decode attention (spec block). Returns 0; 1 + b when context[b]
 * is outside [1, ldslots]; -1 - i when slots.flat[i] is outside [0, S). The caller
 * checks shapes (H % Hkv == 0, positive sizes). */
static int64_t decode_attention(const float *q, int64_t q_ld, int64_t q_hs, kv_operand k,
                                kv_operand v, const int64_t *slots, int64_t ldslots,
                                const int64_t *context, int64_t S, int B, int H, int Hkv,
                                int dq, int dv, float scale, float *out, uint8_t *workspace,
                                int nthreads) {
    att_operand qo = {q, q_ld, q_hs, 0};
    return attention_paged(qo, k, v, slots, ldslots, context, S, B, H, Hkv, dq, dv, scale, out,
                           workspace, nthreads);
}

/* ====================================================== KV store */
/* torch's float -> bfloat16 (its vectorised conversion, the one .to() and index_put
 * run): round to nearest even, any NaN -> 0xffff. */
static inline uint16_t dec_bf16(float f) {
    return f != f ? (uint16_t)0xffff : f32_to_bf16(f);
}

static void dec_store_row(const kv_operand *c, int64_t slot, int g, const float *src, int n) {
    int64_t off = slot * c->ld + g * c->hs;
    if (!c->bf16) { memcpy((float *)c->p + off, src, 4 * (size_t)n); return; }
    uint16_t *dst = (uint16_t *)c->p + off;
    int i = 0;
#ifdef VL
    for (; i + VL <= n; i += VL) {          /* NaN lanes fixed up by the scalar pass */
        vf x = vf_load(src + i);
        if (vf_nan_bits(x)) break;
        vf_store_bf16(dst + i, x);
    }
#endif
    for (; i < n; i++) dst[i] = dec_bf16(src[i]);
}

/* cache rows slot_mapping[n] <- k[n] (and v[n] when v_src is not NULL), every kv head.
 * Returns 0, or -1 - n for the first slot_mapping[n] outside [0, S) (nothing written). */
static int64_t kv_store(kv_operand kc, kv_operand vc, const float *k, int64_t k_ld, int64_t k_hs,
                        const float *v, int64_t v_ld, int64_t v_hs, const int64_t *slot_mapping,
                        int N, int64_t S, int Hkv, int dk, int dv) {
    for (int n = 0; n < N; n++)
        if (slot_mapping[n] < 0 || slot_mapping[n] >= S) return -1 - (int64_t)n;
    for (int n = 0; n < N; n++)
        for (int g = 0; g < Hkv; g++) {
            dec_store_row(&kc, slot_mapping[n], g, k + n * k_ld + g * k_hs, dk);
            if (v) dec_store_row(&vc, slot_mapping[n], g, v + n * v_ld + g * v_hs, dv);
        }
    return 0;
}
