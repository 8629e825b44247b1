// The __host__ __device__ helpers of cumo_hd.h run on host arrays, chunk by chunk and token by
// token as the kernels run them, so that CI (no GPU) checks the kernels' logic against the torch
// reference. Nothing here touches a device.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cumo_cuda.h"
#include "cumo_ops.h"

namespace cumo {

namespace {

// The path a routing call takes on the device (routing.cu): -1 as the device chooses (a thread per
// token for E <= kThreadExperts, else a warp), 0 a thread, 1 a warp (any E: tests of the warp path at
// small E, where lanes hold no expert).
bool warp_path(int path, int E) {
  if (path < -1 || path > 1)
    throw std::invalid_argument("host_route: path is -1 (as the device), 0 (thread) or 1 (warp)");
  if (path == 0 && E > kThreadExperts)
    throw std::invalid_argument("host_route: the thread path takes E <= " + std::to_string(kThreadExperts));
  return path == 1 || (path == -1 && E > kThreadExperts);
}

// One token's warp, lane by lane (route_warp_kernel / route_backward_warp_kernel of routing.cu):
// l[q][i] = logit of expert q + 32*i, m, s, lse, and x[q][i] (exp, then the probability).
struct Warp {
  int n[kRouteLanes];
  float l[kRouteLanes][kLaneSlots], x[kRouteLanes][kLaneSlots];
  float m, s, lse;
};

void warp_softmax(const float* logits, int E, int dtype, Warp& w) {
  float part[kRouteLanes];
  w.m = -INFINITY;
  for (int q = 0; q < kRouteLanes; ++q) {
    w.n[q] = lane_experts(E, q);
    for (int i = 0; i < kLaneSlots; ++i) w.l[q][i] = i < w.n[q] ? round_to(logits[q + kRouteLanes * i], dtype) : 0.f;
    w.m = fmaxf(w.m, lane_max(w.l[q], w.n[q]));  // warp_max: exact in any order
  }
  for (int q = 0; q < kRouteLanes; ++q) part[q] = lane_exp(w.l[q], w.n[q], w.m, w.x[q]);
  w.s = butterfly_sum(part);  // warp_sum
  w.lse = w.m + logf(w.s);
}

}  // namespace

HostRoute host_route(const std::vector<float>& logits, int T, int E, int k, int B, int dtype, int path) {
  check_dtype(dtype);
  if (E < 1 || E > kMaxExperts || k < 1 || k > E || B < 1 || T % B || logits.size() != size_t(T) * E)
    throw std::invalid_argument("host_route: bad sizes");
  const bool warp = warp_path(path, E);
  HostRoute out;
  out.weights.resize(size_t(T) * k);
  out.ids.resize(size_t(T) * k);
  out.prob_sums.assign(size_t(B) * E, 0.f);
  out.first_counts.assign(size_t(B) * E, 0.f);
  out.z_sums.assign(B, 0.f);
  const int n = T / B;
  std::vector<float> l(E), p(E), w(k);
  std::vector<int> id(k);
  Warp wp;
  for (int t = 0; t < T; ++t) {
    float lse;
    if (!warp) {
      for (int e = 0; e < E; ++e) l[e] = round_to(logits[size_t(t) * E + e], dtype);
      lse = route_token(l.data(), E, k, dtype, p.data(), id.data(), w.data());
    } else {  // route_warp_kernel
      warp_softmax(&logits[size_t(t) * E], E, dtype, wp);
      for (int q = 0; q < kRouteLanes; ++q)
        for (int i = 0; i < wp.n[q]; ++i) p[q + kRouteLanes * i] = wp.x[q][i] = round_to(wp.x[q][i] / wp.s, dtype);
      uint64_t key[kRouteLanes][kLaneSlots], after = ~uint64_t(0);
      for (int q = 0; q < kRouteLanes; ++q) lane_keys(wp.x[q], wp.n[q], q, key[q]);
      float sel = 0.f;
      for (int j = 0; j < k; ++j) {
        uint64_t best = 0;  // warp_max_key over the lanes' candidates
        for (int q = 0; q < kRouteLanes; ++q) {
          const uint64_t c = lane_best_below(key[q], after);
          best = c > best ? c : best;
        }
        if (best == 0) throw std::logic_error("host_route: the warp found no expert left to choose");
        after = best;
        id[j] = key_id(best);
        w[j] = key_score(best);
        sel += w[j];
      }
      sel = round_to(sel, dtype);
      for (int j = 0; j < k; ++j) w[j] = renormalised(w[j], sel, dtype);
      lse = wp.lse;
    }
    for (int j = 0; j < k; ++j) {
      if (id[j] < 0 || id[j] >= E) throw std::logic_error("host_route: an expert id outside 0..E-1");
      out.weights[size_t(t) * k + j] = w[j];
      out.ids[size_t(t) * k + j] = id[j];
    }
    const int b = t / n;
    for (int e = 0; e < E; ++e) out.prob_sums[size_t(b) * E + e] += p[e];
    out.first_counts[size_t(b) * E + id[0]] += 1.f;
    out.z_sums[b] += lse * lse;
  }
  return out;
}

std::vector<float> host_route_backward(const std::vector<float>& logits, const std::vector<int64_t>& ids,
                                       const std::vector<float>& grad_weights,
                                       const std::vector<float>& grad_prob_sums,
                                       const std::vector<float>& grad_z_sums, int T, int E, int k, int B, int dtype,
                                       int path) {
  check_dtype(dtype);
  if (E < 1 || E > kMaxExperts || k < 1 || k > E || B < 1 || T % B || logits.size() != size_t(T) * E ||
      ids.size() != size_t(T) * k || grad_weights.size() != size_t(T) * k || grad_prob_sums.size() != size_t(B) * E ||
      grad_z_sums.size() != size_t(B))
    throw std::invalid_argument("host_route_backward: bad sizes");
  const bool warp = warp_path(path, E);
  std::vector<float> out(size_t(T) * E);
  const int n = T / B;
  std::vector<float> l(E), gw(k), dl(E);
  std::vector<int> id(k);
  Warp wp;
  for (int t = 0; t < T; ++t) {
    const int b = t / n;
    for (int j = 0; j < k; ++j) {
      id[j] = clamp_expert(ids[size_t(t) * k + j], E);
      gw[j] = round_to(grad_weights[size_t(t) * k + j], dtype);
    }
    const float* gp = &grad_prob_sums[size_t(b) * E];
    if (!warp) {
      for (int e = 0; e < E; ++e) l[e] = round_to(logits[size_t(t) * E + e], dtype);
      route_token_backward(l.data(), E, k, dtype, id.data(), gw.data(), gp, grad_z_sums[b], dl.data());
    } else {  // route_backward_warp_kernel
      warp_softmax(&logits[size_t(t) * E], E, dtype, wp);
      float(&p)[kRouteLanes][kLaneSlots] = wp.x;
      for (int q = 0; q < kRouteLanes; ++q)
        for (int i = 0; i < kLaneSlots; ++i) p[q][i] = p[q][i] / wp.s;
      auto prob = [&](int e) { return p[e % kRouteLanes][e / kRouteLanes]; };  // warp_prob
      float sel_sum = 0.f;
      for (int j = 0; j < k; ++j) sel_sum += round_to(prob(id[j]), dtype);
      sel_sum = round_to(sel_sum, dtype);
      float dot = 0.f;
      for (int j = 0; j < k; ++j) dot += gw[j] * (round_to(prob(id[j]), dtype) / sel_sum);
      float d[kRouteLanes][kLaneSlots], part[kRouteLanes];
      for (int q = 0; q < kRouteLanes; ++q)
        for (int i = 0; i < kLaneSlots; ++i) d[q][i] = i < wp.n[q] ? gp[q + kRouteLanes * i] : 0.f;
      for (int j = 0; j < k; ++j) d[id[j] % kRouteLanes][id[j] / kRouteLanes] += (gw[j] - dot) / sel_sum;
      for (int q = 0; q < kRouteLanes; ++q) part[q] = lane_dot(d[q], p[q], wp.n[q]);
      const float pd = butterfly_sum(part);
      for (int e = 0; e < E; ++e)
        dl[e] = grad_logit(prob(e), d[e % kRouteLanes][e / kRouteLanes], pd, wp.lse, grad_z_sums[b]);
    }
    for (int e = 0; e < E; ++e) out[size_t(t) * E + e] = round_to(dl[e], dtype);
  }
  return out;
}

std::vector<int> host_topk(const std::vector<float>& scores, int k) {
  const int E = static_cast<int>(scores.size());
  if (E < 1 || E > kMaxExperts || k < 1 || k > E) throw std::invalid_argument("host_topk: bad sizes");
  std::vector<int> ids(k);
  topk_select(scores.data(), E, k, ids.data());
  return ids;
}

std::pair<u64, float> host_rank_key(float score, int id) {
  if (id < 0 || id >= kMaxExperts) throw std::invalid_argument("host_rank_key: id not in 0..kMaxExperts-1");
  const uint64_t key = rank_key(score, id);
  if (key_id(key) != id) throw std::logic_error("host_rank_key: key_id does not invert rank_key");
  return {key, key_score(key)};
}

bool host_ranks_before(float a, int ia, float b, int ib) { return ranks_before(a, ia, b, ib); }

std::pair<std::vector<int64_t>, std::vector<int64_t>> host_permute_plan(const std::vector<int64_t>& ids, int E,
                                                                         int chunk) {
  if (E < 1 || chunk < 1) throw std::invalid_argument("host_permute_plan: bad sizes");
  const int64_t slots = static_cast<int64_t>(ids.size());
  const int chunks = static_cast<int>((slots + chunk - 1) / chunk);
  const size_t bins = size_t(E) + 1;
  std::vector<int> counts(size_t(chunks) * bins, 0), chunk_ids(chunk);
  for (int64_t i = 0; i < slots; ++i) counts[size_t(i / chunk) * bins + expert_bin(ids[i], E)] += 1;
  std::vector<int64_t> offsets(E + 1), base(size_t(chunks) * bins), sort_idx(slots, -1);
  plan_offsets(counts.data(), chunks, E, offsets.data());
  for (int b = 0; b <= E; ++b) plan_bases(counts.data(), chunks, E, b, offsets[b], base.data());
  for (int c = 0; c < chunks; ++c) {
    const int64_t first = int64_t(c) * chunk;
    const int len = static_cast<int>(std::min<int64_t>(chunk, slots - first));
    for (int i = 0; i < len; ++i) chunk_ids[i] = expert_bin(ids[first + i], E);
    for (int i = 0; i < len; ++i)
      sort_idx[base[size_t(c) * bins + chunk_ids[i]] + rank_in_chunk(chunk_ids.data(), i)] = first + i;
  }
  return {sort_idx, offsets};
}

std::vector<int> host_tile_schedule(const std::vector<int64_t>& offsets, int bm, i64 M) {
  if (offsets.size() < 2 || bm < 1) throw std::invalid_argument("host_tile_schedule: bad sizes");
  const int E = static_cast<int>(offsets.size()) - 1;
  std::vector<int> tiles(E + 2);
  build_tile_schedule(offsets.data(), E, M < 0 ? offsets.back() : M, bm, tiles.data());
  return tiles;
}

int host_find_tile_expert(const std::vector<int>& tiles, int tile) {  // tiles: G + 1 entries
  if (tiles.size() < 2) throw std::invalid_argument("host_find_tile_expert: bad sizes");
  return find_tile_expert(tiles.data(), static_cast<int>(tiles.size()) - 1, tile);
}

std::vector<std::vector<int64_t>> host_compact_problems(const std::vector<int64_t>& offsets, i64 M) {
  if (offsets.size() < 2) throw std::invalid_argument("host_compact_problems: bad sizes");
  const int E = static_cast<int>(offsets.size()) - 1;
  std::vector<int> experts(E);
  std::vector<int64_t> rows(E), starts(E);
  const int n = compact_problems(offsets.data(), E, M < 0 ? offsets.back() : M, experts.data(), rows.data(),
                                 starts.data());
  std::vector<std::vector<int64_t>> out;
  for (int i = 0; i < n; ++i) out.push_back({experts[i], rows[i], starts[i]});
  return out;
}

std::vector<std::vector<int64_t>> host_problem_list(int kind, const std::vector<int64_t>& offsets, i64 K, i64 N,
                                                    i64 M) {
  if (offsets.size() < 2 || kind < kForward || kind > kGradW || K < 1 || N < 1)
    throw std::invalid_argument("host_problem_list: bad arguments");
  const int E = static_cast<int>(offsets.size()) - 1;
  std::vector<GroupedProblem> list(E);
  build_problem_list(kind, offsets.data(), E, M < 0 ? offsets.back() : M, K, N, list.data());
  std::vector<std::vector<int64_t>> out;
  for (const GroupedProblem& p : list) out.push_back({p.m, p.n, p.k, p.a, p.b, p.d, p.lda, p.ldb, p.ldd, p.dummy});
  return out;
}

bool host_aligned16(u64 address, i64 row_elems, int elem_bytes) { return aligned16(address, row_elems, elem_bytes); }

std::vector<u64> host_list_layout(u64 base, int E, i64 width, u64 shape, u64 stride_a, u64 stride_b, u64 stride_d,
                                  u64 elem) {
  if (E < 1 || width < 1) throw std::invalid_argument("host_list_layout: bad arguments");
  const ListLayout l = list_layout(base, E, width, shape, stride_a, stride_b, stride_d, elem);
  return {l.shapes, l.a, l.b, l.d, l.sa, l.sb, l.sd, l.zero, l.scratch, l.list, l.end};
}

u64 host_list_workspace_bytes(int E, i64 width, u64 shape, u64 stride_a, u64 stride_b, u64 stride_d, u64 elem,
                              u64 after) {
  if (E < 1 || width < 1) throw std::invalid_argument("host_list_workspace_bytes: bad arguments");
  return list_workspace_bytes(E, width, shape, stride_a, stride_b, stride_d, elem, after);
}

u64 host_problem_bytes() { return sizeof(GroupedProblem); }

float host_round_to(float v, int dtype) {
  check_dtype(dtype);
  return round_to(v, dtype);
}

std::vector<float> host_activation(const std::vector<float>& v, int act, bool derivative) {
  if (act < kNone || act > kRelu) throw std::invalid_argument("host_activation: activation code not in 0..5");
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = derivative ? act_derivative(v[i], act) : act_apply(v[i], act);
  return out;
}

int host_bias_lanes() { return kBiasLanes; }

std::pair<std::vector<float>, std::vector<float>> host_act_bias_grad(const std::vector<float>& grad_y,
                                                                     const std::vector<float>& pre,
                                                                     const std::vector<int64_t>& offsets, i64 N,
                                                                     int act, int dtype) {
  check_dtype(dtype);
  if (act < kNone || act > kRelu) throw std::invalid_argument("host_act_bias_grad: activation code not in 0..5");
  if (offsets.size() < 2 || offsets.front() != 0 || N < 1)
    throw std::invalid_argument("host_act_bias_grad: bad offsets or N");
  const int E = static_cast<int>(offsets.size()) - 1;
  for (int e = 0; e < E; ++e)
    if (offsets[e + 1] < offsets[e]) throw std::invalid_argument("host_act_bias_grad: offsets decrease");
  const size_t n_elems = size_t(offsets.back()) * N;
  if (grad_y.size() != n_elems || (act != kNone && pre.size() != n_elems))
    throw std::invalid_argument("host_act_bias_grad: grad_y / pre are not [offsets[-1], N]");
  std::vector<float> grad_pre(act != kNone ? n_elems : 0);
  std::vector<float> grad_b(size_t(E) * N);
  float parts[kBiasLanes];
  for (int e = 0; e < E; ++e)
    for (i64 n = 0; n < N; ++n) {
      for (int lane = 0; lane < kBiasLanes; ++lane)
        parts[lane] = act_bias_lane<float>(grad_y.data(), act != kNone ? pre.data() : nullptr,
                                           act != kNone ? grad_pre.data() : nullptr, N, n, offsets[e],
                                           offsets[e + 1], lane, act, dtype);
      grad_b[size_t(e) * N + n] = round_to(sum_lanes(parts, 1), dtype);
    }
  return {grad_pre, grad_b};
}

}  // namespace cumo
