// Host-and-device helpers of cumo_kernels._cuda: the index math, the top-k tie rule, the
// offsets / sort-order plan, the tile schedule and problem-list compaction of the grouped GEMM,
// the rounding points of the routing math and the activations.
//
// Everything here is `__host__ __device__`: the kernels call it on the GPU, and the `host_*`
// functions of the module (host_tests.cu) call the very same code on host arrays, so CI proves
// it against the torch reference on a machine without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cumo_codes.h"

#define CUMO_HD __host__ __device__ __forceinline__

namespace cumo {


// ------------------------------------------------------------------------------ rounding points

// v rounded to the activation dtype (round-to-nearest-even), returned as float.
CUMO_HD float round_to(float v, int dtype) {
  if (dtype == kF16) return __half2float(__float2half_rn(v));
  if (dtype == kBF16) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

// ------------------------------------------------------------------------------ top-k tie rule

// True when score a (expert ia) ranks before score b (expert ib) in a descending order: larger
// first, NaN above everything (as torch.sort), equal scores: the lower expert index first.
CUMO_HD bool ranks_before(float a, int ia, float b, int ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return (an && bn) ? ia < ib : an;
  if (a != b) return a > b;
  return ia < ib;
}

// A 64-bit key whose integer order is ranks_before's order: key(a, ia) > key(b, ib) exactly when
// ranks_before(a, ia, b, ib). High word: the score's bits mapped monotonically (NaN above +inf,
// -0 as +0: equal scores); low word: 0xFFFFFFFE - id (the lower index ranks first). Every key is
// > 0 and < UINT64_MAX, so 0 means "none" and UINT64_MAX "before everything" (a test in
// tests/test_cuda_ext.py checks the order against ranks_before, ties, NaN, +-0 and infinities
// included). Top-k then needs neither a mask of taken experts nor more than one compare per score.
CUMO_HD uint64_t rank_key(float score, int id) {
  uint32_t u = 0xFFFFFFFFu;  // NaN
  if (score == score) {
    const float v = score == 0.f ? 0.f : score;
#ifdef __CUDA_ARCH__
    u = __float_as_uint(v);
#else
    memcpy(&u, &v, sizeof u);
#endif
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(u) << 32) | (0xFFFFFFFEu - static_cast<uint32_t>(id));
}

CUMO_HD int key_id(uint64_t key) { return static_cast<int>(0xFFFFFFFEu - static_cast<uint32_t>(key)); }

// The score of a key: the score itself, except -0 (comes back as +0: the probabilities the routing
// ranks are never -0) and NaN (a NaN: the NaN key's high word 0xFFFFFFFF gives 0x7FFFFFFF).
CUMO_HD float key_score(uint64_t key) {
  uint32_t u = static_cast<uint32_t>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float v;
  memcpy(&v, &u, sizeof v);
  return v;
#endif
}

// One step of top-k: the larger of `best` and `key` if key ranks after the key `after` (key < after),
// else best. The best-ranked score after the (j-1)-th choice, the j-th, is the largest key below the
// (j-1)-th's (start from best = 0, "none"; after = UINT64_MAX for the first choice): no mask of the
// experts taken, one compare of 64-bit keys per score.
CUMO_HD uint64_t best_below(uint64_t best, uint64_t key, uint64_t after) {
  return key < after && key > best ? key : best;
}

// ids[0..k) = the k best of scores[0..E), best first (ranks_before), 1 <= k <= E <= kMaxExperts.
CUMO_HD void topk_select(const float* scores, int E, int k, int* ids) {
  uint64_t after = ~uint64_t(0);
  for (int j = 0; j < k; ++j) {
    uint64_t best = 0;
    for (int i = 0; i < E; ++i) best = best_below(best, rank_key(scores[i], i), after);
    ids[j] = key_id(best);
    after = best;
  }
}

// ------------------------------------------------------------------------- routing, one token

// The routing kernels (routing.cu) map a token to a thread for E <= kThreadExperts: route_token and
// route_token_backward below, the token's scores in per-thread arrays; and to a warp for larger E
// (up to kMaxExperts): lane q holds the experts q, q + 32, q + 64, ..., at most kLaneSlots of them,
// in registers (the "warp path" further below). Both apply the same rounding points and tie rule.
constexpr int kThreadExperts = 64;
constexpr int kRouteLanes = 32;
constexpr int kLaneSlots = kMaxExperts / kRouteLanes;

// The weight of a choice: its probability over the rounded sum of the chosen ones' probabilities.
CUMO_HD float renormalised(float p, float sel_sum, int dtype) { return round_to(p / sel_sum, dtype); }

// The gradient of a logit from its float32 probability p, its dprobs dl, pd = sum over the experts
// of dl * p, the token's logsumexp and the z-loss gradient gz (the warp path's; route_token_backward
// keeps its own line: nvcc contracts the two products into an FMA differently once the expression
// is a function of its own, and the thread path stays bit for bit as it was).
CUMO_HD float grad_logit(float p, float dl, float pd, float lse, float gz) {
  return p * (dl - pd) + 2.f * lse * gz * p;
}

// Forward of one token on one thread (CUMO.md, "Routing and the auxiliary losses"): logits
// l[0..E) already in float32 (read from the activation dtype). Writes probs[0..E) (float32
// softmax rounded to the activation dtype), ids[0..k), weights[0..k) (renormalised, rounded to the
// activation dtype) and returns logsumexp(l) in float32.
CUMO_HD float route_token(const float* l, int E, int k, int dtype, float* probs, int* ids, float* weights) {
  float m = l[0];
  for (int e = 1; e < E; ++e) m = fmaxf(m, l[e]);
  float s = 0.f;
  for (int e = 0; e < E; ++e) s += expf(l[e] - m);
  for (int e = 0; e < E; ++e) probs[e] = round_to(expf(l[e] - m) / s, dtype);
  topk_select(probs, E, k, ids);
  float sum = 0.f;
  for (int j = 0; j < k; ++j) sum += probs[ids[j]];
  sum = round_to(sum, dtype);  // the sum of the selected probabilities, in the activation dtype
  for (int j = 0; j < k; ++j) weights[j] = renormalised(probs[ids[j]], sum, dtype);
  return m + logf(s);
}

// Backward of one token: gradient of (weights, this sample's prob_sums row, z_sums) with respect
// to the logits, in float32 (the caller rounds). gw[0..k), gp[0..E) (the token's sample row), gz.
// The rounding to the activation dtype passes gradients unchanged; the choice carries none.
// w = sel / sum is differentiated at the values CuMo's autograd saved: the probabilities and
// their sum rounded to the activation dtype (as route_token); the softmax backward uses the
// float32 probabilities. For k = 1, sum == sel: the weight is exactly 1, its gradient 0.
CUMO_HD void route_token_backward(const float* l, int E, int k, int dtype, const int* ids, const float* gw,
                                  const float* gp, float gz, float* dl) {
  float m = l[0];
  for (int e = 1; e < E; ++e) m = fmaxf(m, l[e]);
  float s = 0.f;
  for (int e = 0; e < E; ++e) s += expf(l[e] - m);
  const float lse = m + logf(s);
  float p[kThreadExperts];  // E <= kThreadExperts
  for (int e = 0; e < E; ++e) p[e] = expf(l[e] - m) / s;
  float sel_sum = 0.f;
  for (int j = 0; j < k; ++j) sel_sum += round_to(p[ids[j]], dtype);
  sel_sum = round_to(sel_sum, dtype);  // as in route_token
  float dot = 0.f;  // sum_j gw_j * w_j
  for (int j = 0; j < k; ++j) dot += gw[j] * (round_to(p[ids[j]], dtype) / sel_sum);
  for (int e = 0; e < E; ++e) dl[e] = gp[e];  // dprobs
  for (int j = 0; j < k; ++j) dl[ids[j]] += (gw[j] - dot) / sel_sum;
  float pd = 0.f;
  for (int e = 0; e < E; ++e) pd += dl[e] * p[e];
  for (int e = 0; e < E; ++e) dl[e] = p[e] * (dl[e] - pd) + 2.f * lse * gz * p[e];
}

// ------------------------------------------------------------- routing, a warp per token (E > 64)
// The same math as route_token / route_token_backward, computed by the 32 lanes of a warp: lane q
// holds the logits of the experts q + 32*i, i < lane_experts(E, q), in l[i]. Sums over the experts
// are each lane's partial sum (in slot order) combined over the lanes in the butterfly order of
// __shfl_xor_sync with offsets 16, 8, 4, 2, 1 (butterfly_sum: every lane ends with the same value);
// maxima (of logits, of rank keys) are exact in any order. The sums over the k choices run in
// choice order on every lane, as on a thread. routing.cu's warp kernels and host_tests.cu's lanes
// (one after another, butterfly_sum for the shuffles) call these functions.

CUMO_HD int lane_experts(int E, int lane) { return lane < E ? (E - 1 - lane) / kRouteLanes + 1 : 0; }

// v[slot] for a slot known only at run time, without indexing the register array (no local memory).
template <typename V>
CUMO_HD V lane_slot(const V (&v)[kLaneSlots], int slot) {
  V out = v[0];
#pragma unroll
  for (int i = 1; i < kLaneSlots; ++i)
    if (i == slot) out = v[i];
  return out;
}

// The lane's largest logit (-inf when it holds none).
CUMO_HD float lane_max(const float (&l)[kLaneSlots], int n) {
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i)
    if (i < n) m = fmaxf(m, l[i]);
  return m;
}

// The lane's part of the softmax: x[i] = expf(l[i] - m); returns their sum in slot order.
CUMO_HD float lane_exp(const float (&l)[kLaneSlots], int n, float m, float (&x)[kLaneSlots]) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i) {
    x[i] = i < n ? expf(l[i] - m) : 0.f;
    s += x[i];
  }
  return s;
}

// The lane's rank keys (0, never chosen, past its n experts) and its candidate for the next choice:
// the largest of them below `after` (best_below).
CUMO_HD void lane_keys(const float (&p)[kLaneSlots], int n, int lane, uint64_t (&key)[kLaneSlots]) {
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i) key[i] = i < n ? rank_key(p[i], lane + kRouteLanes * i) : 0;
}

CUMO_HD uint64_t lane_best_below(const uint64_t (&key)[kLaneSlots], uint64_t after) {
  uint64_t best = 0;
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i) best = best_below(best, key[i], after);
  return best;
}

// The host's stand-in for the shuffles: the butterfly sum of v[0..32) (one value per lane), as
// `v += __shfl_xor_sync(~0u, v, o)` for o = 16, 8, 4, 2, 1 computes it on every lane.
CUMO_HD float butterfly_sum(const float* v) {
  float a[kRouteLanes], b[kRouteLanes];
  for (int q = 0; q < kRouteLanes; ++q) a[q] = v[q];
  for (int o = kRouteLanes / 2; o > 0; o /= 2) {
    for (int q = 0; q < kRouteLanes; ++q) b[q] = a[q] + a[q ^ o];
    for (int q = 0; q < kRouteLanes; ++q) a[q] = b[q];
  }
  return a[0];
}

// Backward, the lane's part after the choice sums (route_token_backward's last three steps):
// dl[i] = dprobs of expert e = lane + 32*i (gp, plus (gw_j - dot) / sel_sum for each choice j of
// e, in choice order: added by the caller), p[i] the float32 probabilities. Returns the lane's
// partial sum of dl * p (slot order); grad_logit then gives the gradient with the warp's sum pd.
CUMO_HD float lane_dot(const float (&dl)[kLaneSlots], const float (&p)[kLaneSlots], int n) {
  float pd = 0.f;
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i)
    if (i < n) pd += dl[i] * p[i];
  return pd;
}

// --------------------------------------------------------------- offsets and sort order (plan)

// Slots (t, j) are grouped by expert, stable in slot order, the dropped slots (bin E) last. The
// slots are cut into chunks of `chunk` slots; chunk c counts its slots per bin b in 0..E
// (counts[c*(E+1) + b]); then
//   offsets[e] = sum of all counts of experts < e (offsets[E]: the routed slots),
//   base[c*(E+1) + b] = offsets[b] + sum over chunks c' < c of counts[c'*(E+1) + b],
// and slot i of chunk c in bin b goes to row base[c*(E+1) + b] + (slots of bin b before i in c).

// A slot's bin in the plan: its expert for an id in 0..E-1, else E: a dropped slot (an id >= E is
// expert parallelism's sentinel; a negative id, refused by the public op where it validates,
// is dropped too rather than indexing out of bounds).
CUMO_HD int expert_bin(int64_t id, int E) { return id < 0 || id >= E ? E : static_cast<int>(id); }

// An expert id made safe to index with: out-of-range ids (a caller's bug) go to the last expert
// rather than writing out of bounds.
CUMO_HD int clamp_expert(int64_t id, int E) { return id < 0 ? 0 : (id >= E ? E - 1 : static_cast<int>(id)); }

// offsets[0..E] from the per-chunk counts (E + 1 bins per chunk), summing over chunks in order.
CUMO_HD void plan_offsets(const int* counts, int chunks, int E, int64_t* offsets) {
  int64_t run = 0;
  for (int e = 0; e < E; ++e) {
    offsets[e] = run;
    for (int c = 0; c < chunks; ++c) run += counts[c * (E + 1) + e];
  }
  offsets[E] = run;
}

// base[c*(E+1) + b] for one bin b in 0..E, starting at offset_b = offsets[b] (the device runs one
// thread per bin).
CUMO_HD void plan_bases(const int* counts, int chunks, int E, int b, int64_t offset_b, int64_t* base) {
  int64_t run = offset_b;
  for (int c = 0; c < chunks; ++c) {
    base[c * (E + 1) + b] = run;
    run += counts[c * (E + 1) + b];
  }
}

// Rank of slot `pos` among the slots of its chunk with the same expert (chunk_ids: the chunk's
// clamped expert ids).
CUMO_HD int rank_in_chunk(const int* chunk_ids, int pos) {
  const int e = chunk_ids[pos];
  int r = 0;
  for (int i = 0; i < pos; ++i) r += chunk_ids[i] == e;
  return r;
}

// The token a grouped row comes from (sort_idx holds flat slots t*k + j).
CUMO_HD int64_t token_of_slot(int64_t slot, int k) { return slot / k; }

// ------------------------------------------------------- grouped GEMM: schedule and compaction

// The rows [begin, end) of group g of M grouped rows: expert g's for g < E, and for g == E the rows
// offsets[E]:M, which belong to no expert (dropped slots: the GEMMs write zeros there). Offsets are
// clamped into [0, M] as they are read, so that no row outside [0, M) is ever addressed whatever
// a caller passes (wrong offsets give wrong rows, never an access out of bounds).
CUMO_HD void group_rows(const int64_t* offsets, int E, int64_t M, int g, int64_t& begin, int64_t& end) {
  const int64_t lo = offsets[g];
  begin = lo < 0 ? 0 : (lo > M ? M : lo);
  const int64_t hi = g < E ? offsets[g + 1] : M;
  end = hi < begin ? begin : (hi > M ? M : hi);
}

// Row-tile schedule over the E + 1 groups of group_rows: tiles[g] = number of tiles of bm rows
// before group g; tiles[E+1] = total. Groups without rows get no tile: an expert without rows
// never reaches a GEMM (DESIGN.md), and the dropped rows' group is empty unless permute dropped
// slots.
CUMO_HD void build_tile_schedule(const int64_t* offsets, int E, int64_t M, int bm, int* tiles) {
  int run = 0;
  for (int g = 0; g <= E; ++g) {
    tiles[g] = run;
    int64_t begin, end;
    group_rows(offsets, E, M, g, begin, end);
    run += static_cast<int>((end - begin + bm - 1) / bm);
  }
  tiles[E + 1] = run;
}

// The group owning global tile `tile` (tiles[g] <= tile < tiles[g+1], skipping empty groups) among
// G groups, or -1 when tile >= tiles[G] (the grid is launched for an upper bound of the tile count).
CUMO_HD int find_tile_expert(const int* tiles, int G, int tile) {
  if (tile >= tiles[G]) return -1;
  int lo = 0, hi = G - 1;  // the last g with tiles[g] <= tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tiles[mid] <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// An upper bound of the tile count of build_tile_schedule's E + 1 groups that the host knows
// without reading offsets.
CUMO_HD int max_tiles(int64_t rows, int E, int bm) { return static_cast<int>((rows + bm - 1) / bm) + E + 1; }

// Problem-list compaction: experts[0..n) = the experts with rows, in order, rows[i] their row
// counts, starts[i] their first rows (group_rows: clamped into [0, M)); returns n. (The CUTLASS
// paths take this list.)
CUMO_HD int compact_problems(const int64_t* offsets, int E, int64_t M, int* experts, int64_t* rows, int64_t* starts) {
  int n = 0;
  for (int e = 0; e < E; ++e) {
    int64_t begin, end;
    group_rows(offsets, E, M, e, begin, end);
    if (end > begin) {
      experts[n] = e;
      rows[n] = end - begin;
      starts[n] = begin;
      ++n;
    }
  }
  return n;
}

// One grouped GEMM problem of the CUTLASS paths: D[m, n] = A[m, k] . B[k, n], with element offsets
// into the operands and leading dimensions. Layouts are fixed per kind: kForward A row-major, B
// column-major (W is [N, K]); kGradX A row-major, B row-major; kGradW A column-major (g^T),
// B row-major; D row-major. A dummy problem (an expert without rows: the list keeps E entries so
// that the host-known E is the group count, and no zero-size problem reaches CUTLASS) reads a zero
// row (a: into `zero`; b: into B, or into `zero` for kGradW) and writes scratch row i (d: into
// `scratch`).
enum GemmKind : int { kForward = 0, kGradX = 1, kGradW = 2 };

struct GroupedProblem {
  int m, n, k;
  int64_t a, b, d;
  int64_t lda, ldb, ldd;
  int dummy;
};

// The problem of expert e with `rows` rows starting at row `start`; K: the layer's input width,
// N: its output width.
CUMO_HD GroupedProblem real_problem(int kind, int e, int64_t start, int64_t rows, int64_t K, int64_t N) {
  GroupedProblem p;
  p.dummy = 0;
  if (kind == kForward) {  // y[rows, N] = x[rows, K] . W[e]^T
    p.m = static_cast<int>(rows), p.n = static_cast<int>(N), p.k = static_cast<int>(K);
    p.a = start * K, p.b = e * N * K, p.d = start * N;
    p.lda = K, p.ldb = K, p.ldd = N;
  } else if (kind == kGradX) {  // gx[rows, K] = g[rows, N] . W[e]
    p.m = static_cast<int>(rows), p.n = static_cast<int>(K), p.k = static_cast<int>(N);
    p.a = start * N, p.b = e * N * K, p.d = start * K;
    p.lda = N, p.ldb = K, p.ldd = K;
  } else {  // gW[e][N, K] = g[rows, N]^T . x[rows, K]
    p.m = static_cast<int>(N), p.n = static_cast<int>(K), p.k = static_cast<int>(rows);
    p.a = start * N, p.b = start * K, p.d = e * N * K;
    p.lda = N, p.ldb = K, p.ldd = K;
  }
  return p;
}

// Dummy problem i: one output row into scratch row i (scratch rows are max(N, K) wide).
CUMO_HD GroupedProblem dummy_problem(int kind, int i, int64_t K, int64_t N) {
  GroupedProblem p = real_problem(kind, 0, 0, 1, K, N);
  const int64_t width = N > K ? N : K;
  if (kind == kGradW) p.m = 1, p.k = 1;  // 1 x K output from a 1 x 1 by 1 x K product
  p.a = 0, p.b = 0, p.d = i * width;
  p.dummy = 1;
  return p;
}

// The whole list of one launch over M grouped rows: experts with rows first, in order (their rows
// from group_rows), then dummies; returns the number of real problems. (The device's setup kernels
// run this rule; host_tests.cu checks it.)
CUMO_HD int build_problem_list(int kind, const int64_t* offsets, int E, int64_t M, int64_t K, int64_t N,
                               GroupedProblem* out) {
  int n = 0;
  for (int e = 0; e < E; ++e) {
    int64_t begin, end;
    group_rows(offsets, E, M, e, begin, end);
    if (end > begin) out[n++] = real_problem(kind, e, begin, end - begin, K, N);
  }
  for (int i = n; i < E; ++i) out[i] = dummy_problem(kind, i, K, N);
  return n;
}

// The problem list's pieces in a caller's workspace, one rule for the sizing (on the host, from
// base 0) and the carving (in run_kind, from the real base), so that the two cannot disagree (the
// sm90 sizing once counted the three pointer arrays as one piece while the carving rounded each to
// 256 bytes: "workspace too small" on the first GPU run). Each piece starts on a 256-byte boundary,
// in this order: shapes, a, b, d pointers, the three per-problem strides, the zero row, the scratch
// rows, the problem list; `end` is where the next user (CUTLASS's own workspace) may start.
struct ListLayout {
  uint64_t shapes, a, b, d, sa, sb, sd, zero, scratch, list, end;
};

CUMO_HD uint64_t round_up256(uint64_t v) { return (v + 255) / 256 * 256; }

// The next piece of `bytes` at `at` (256-aligned), moving `at` past it.
CUMO_HD uint64_t take_piece(uint64_t& at, uint64_t bytes) {
  const uint64_t out = at;
  at += round_up256(bytes);
  return out;
}

// Element sizes in bytes: shape (one problem's shape), stride_a/b/d (one problem's stride of each
// operand), elem (one matrix element); width = max(N, K) elements.
CUMO_HD ListLayout list_layout(uint64_t base, int E, int64_t width, uint64_t shape, uint64_t stride_a,
                               uint64_t stride_b, uint64_t stride_d, uint64_t elem) {
  const uint64_t e = static_cast<uint64_t>(E), w = static_cast<uint64_t>(width);
  uint64_t at = round_up256(base);
  ListLayout l;
  l.shapes = take_piece(at, shape * e);
  l.a = take_piece(at, sizeof(void*) * e);
  l.b = take_piece(at, sizeof(void*) * e);
  l.d = take_piece(at, sizeof(void*) * e);
  l.sa = take_piece(at, stride_a * e);
  l.sb = take_piece(at, stride_b * e);
  l.sd = take_piece(at, stride_d * e);
  l.zero = take_piece(at, elem * w);
  l.scratch = take_piece(at, elem * w * e);
  l.list = take_piece(at, sizeof(GroupedProblem) * e);
  l.end = at;
  return l;
}

// Bytes of workspace that hold the layout from any base address (up to 255 bytes go to aligning
// the base) and leave `after` bytes, 256-aligned, behind it.
CUMO_HD uint64_t list_workspace_bytes(int E, int64_t width, uint64_t shape, uint64_t stride_a, uint64_t stride_b,
                                      uint64_t stride_d, uint64_t elem, uint64_t after) {
  return 255 + list_layout(0, E, width, shape, stride_a, stride_b, stride_d, elem).end + after;
}

// 16-byte alignment of an operand: its address and its row pitch in bytes.
CUMO_HD bool aligned16(uint64_t address, int64_t row_elems, int elem_bytes) {
  return address % 16 == 0 && (row_elems * elem_bytes) % 16 == 0;
}

// ------------------------------------------------------------------------------ activations

CUMO_HD float sigmoidf_(float v) { return 1.f / (1.f + expf(-v)); }

CUMO_HD float act_apply(float v, int act) {
  switch (act) {
    case kQuickGelu:
      return v * sigmoidf_(1.702f * v);
    case kGelu:
      return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case kGeluTanh: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + tanhf(inner));
    }
    case kSilu:
      return v / (1.f + expf(-v));
    case kRelu:
      return v > 0.f ? v : 0.f;
    default:
      return v;
  }
}

CUMO_HD float act_derivative(float v, int act) {
  switch (act) {
    case kQuickGelu: {
      const float s = sigmoidf_(1.702f * v);
      return s + 1.702f * v * s * (1.f - s);
    }
    case kGelu:
      return 0.5f * (1.f + erff(v * 0.70710678118654752f)) + v * expf(-0.5f * v * v) * 0.39894228040143268f;
    case kGeluTanh: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      const float t = tanhf(inner);
      const float dinner = 0.79788456080286536f * (1.f + 3.f * 0.044715f * v * v);
      return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * dinner;
    }
    case kSilu: {
      const float s = sigmoidf_(v);
      return s * (1.f + v * (1.f - s));
    }
    case kRelu:
      return v > 0.f ? 1.f : 0.f;
    default:
      return 1.f;
  }
}

}  // namespace cumo
