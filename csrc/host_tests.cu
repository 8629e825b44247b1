// The __host__ __device__ helpers of cumo_hd.h run on host arrays, chunk by chunk and token by
// token as the kernels run them, so that CI (no GPU) checks the kernels' logic against the torch
// reference. Nothing here touches a device.
#include <algorithm>
#include <stdexcept>

#include "cumo_cuda.h"
#include "cumo_ops.h"

namespace cumo {

HostRoute host_route(const std::vector<float>& logits, int T, int E, int k, int B, int dtype) {
  check_dtype(dtype);
  if (E < 1 || E > kMaxExperts || k < 1 || k > E || B < 1 || T % B || logits.size() != size_t(T) * E)
    throw std::invalid_argument("host_route: bad sizes");
  HostRoute out;
  out.weights.resize(size_t(T) * k);
  out.ids.resize(size_t(T) * k);
  out.prob_sums.assign(size_t(B) * E, 0.f);
  out.first_counts.assign(size_t(B) * E, 0.f);
  out.z_sums.assign(B, 0.f);
  const int n = T / B;
  float l[kMaxExperts], p[kMaxExperts], w[kMaxExperts];
  int id[kMaxExperts];
  for (int t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) l[e] = round_to(logits[size_t(t) * E + e], dtype);
    const float lse = route_token(l, E, k, dtype, p, id, w);
    for (int j = 0; j < k; ++j) {
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
                                       const std::vector<float>& grad_z_sums, int T, int E, int k, int B, int dtype) {
  check_dtype(dtype);
  if (E < 1 || E > kMaxExperts || k < 1 || k > E || B < 1 || T % B || logits.size() != size_t(T) * E ||
      ids.size() != size_t(T) * k || grad_weights.size() != size_t(T) * k || grad_prob_sums.size() != size_t(B) * E ||
      grad_z_sums.size() != size_t(B))
    throw std::invalid_argument("host_route_backward: bad sizes");
  std::vector<float> out(size_t(T) * E);
  const int n = T / B;
  float l[kMaxExperts], gw[kMaxExperts], dl[kMaxExperts];
  int id[kMaxExperts];
  for (int t = 0; t < T; ++t) {
    const int b = t / n;
    for (int e = 0; e < E; ++e) l[e] = round_to(logits[size_t(t) * E + e], dtype);
    for (int j = 0; j < k; ++j) {
      id[j] = clamp_expert(ids[size_t(t) * k + j], E);
      gw[j] = round_to(grad_weights[size_t(t) * k + j], dtype);
    }
    route_token_backward(l, E, k, dtype, id, gw, &grad_prob_sums[size_t(b) * E], grad_z_sums[b], dl);
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
