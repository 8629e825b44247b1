// pybind11 module cumo_kernels._cuda. No torch: pointers, sizes, dtype codes and the stream
// handle arrive as Python ints; cumo_kernels/cuda.py allocates, checks and calls these.
// Every device function raises RuntimeError "... no CUDA device is available ..." on a machine
// without a usable GPU, before it launches anything; the host_* functions run the kernels'
// __host__ __device__ helpers on host arrays (tests/test_cuda_ext.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cumo_codes.h"
#include "cumo_ops.h"

namespace py = pybind11;
using namespace cumo;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "CUDA kernels of cumo-kernels (routing, permutation, grouped GEMM), built without the torch ABI";
  // The codes the kernels take, exported from cumo_hd.h's enums (cumo_kernels/cuda.py reads these).
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = int(kF32), py::arg("float16") = int(kF16),
                                   py::arg("bfloat16") = int(kBF16));
  m.attr("ACTIVATION_CODES") =
      py::dict(py::arg("none") = int(kNone), py::arg("quick_gelu") = int(kQuickGelu), py::arg("gelu") = int(kGelu),
               py::arg("gelu_tanh") = int(kGeluTanh), py::arg("silu") = int(kSilu), py::arg("relu") = int(kRelu));
  m.attr("MAX_EXPERTS") = kMaxExperts;  // the routing kernels' limit (cumo_kernels/cuda.py reads it)
  m.attr("BIAS_LANES") = host_bias_lanes();

  m.def("device_count", &device_count, "Number of CUDA devices; raises 'no CUDA device is available' if none.");
  m.def("device_capability", &device_capability, py::arg("device"), "major*10+minor of a device.");
  m.def("build_info", &build_info, "Archs, CUDA runtime version and CUTLASS paths of this build.");

  m.def("route_forward", &route_forward, py::arg("logits"), py::arg("T"), py::arg("E"), py::arg("k"), py::arg("B"),
        py::arg("dtype"), py::arg("weights"), py::arg("ids"), py::arg("prob_sums"), py::arg("first_counts"),
        py::arg("z_sums"), py::arg("workspace"), py::arg("stream"), py::arg("device"),
        "Routing forward; workspace: float32 [T*E + 2*T].");
  m.def("route_backward", &route_backward, py::arg("grad_weights"), py::arg("grad_prob_sums"),
        py::arg("grad_z_sums"), py::arg("logits"), py::arg("ids"), py::arg("T"), py::arg("E"), py::arg("k"),
        py::arg("B"), py::arg("dtype"), py::arg("grad_logits"), py::arg("stream"), py::arg("device"));

  m.def("permute_workspace_bytes", &permute_workspace_bytes, py::arg("slots"), py::arg("E"));
  m.def("permute_forward", &permute_forward, py::arg("x"), py::arg("ids"), py::arg("T"), py::arg("k"), py::arg("H"),
        py::arg("E"), py::arg("dtype"), py::arg("x_sorted"), py::arg("sort_idx"), py::arg("offsets"),
        py::arg("workspace"), py::arg("stream"), py::arg("device"));
  m.def("permute_backward", &permute_backward, py::arg("grad_sorted"), py::arg("sort_idx"), py::arg("T"),
        py::arg("k"), py::arg("H"), py::arg("dtype"), py::arg("grad_x"), py::arg("workspace"), py::arg("stream"),
        py::arg("device"));
  m.def("unpermute_forward", &unpermute_forward, py::arg("y_sorted"), py::arg("sort_idx"), py::arg("weights"),
        py::arg("T"), py::arg("k"), py::arg("N"), py::arg("dtype"), py::arg("out"), py::arg("workspace"),
        py::arg("stream"), py::arg("device"));
  m.def("unpermute_backward", &unpermute_backward, py::arg("grad_out"), py::arg("y_sorted"), py::arg("sort_idx"),
        py::arg("weights"), py::arg("T"), py::arg("k"), py::arg("N"), py::arg("dtype"), py::arg("grad_y_sorted"),
        py::arg("grad_weights"), py::arg("workspace"), py::arg("stream"), py::arg("device"));

  m.def("gemm_workspace_bytes", &gemm_workspace_bytes, py::arg("M"), py::arg("K"), py::arg("N"), py::arg("E"),
        py::arg("dtype"), py::arg("use_cutlass"), py::arg("device"));
  m.def("cutlass_supports", &cutlass_supports, py::arg("capability"), py::arg("dtype"),
        "Whether this build has a CUTLASS grouped GEMM for this compute capability and dtype code.");
  m.def("grouped_linear_forward", &grouped_linear_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("offsets"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("E"), py::arg("dtype"), py::arg("act"),
        py::arg("y"), py::arg("pre"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("use_cutlass"),
        py::arg("stream"), py::arg("device"));
  m.def("grouped_linear_backward", &grouped_linear_backward, py::arg("grad_y"), py::arg("x"), py::arg("weight"),
        py::arg("offsets"), py::arg("pre"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("E"), py::arg("dtype"),
        py::arg("act"), py::arg("grad_x"), py::arg("grad_w"), py::arg("grad_b"), py::arg("grad_pre"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("use_cutlass"), py::arg("stream"), py::arg("device"));

  py::class_<HostRoute>(m, "HostRoute")
      .def_readonly("weights", &HostRoute::weights)
      .def_readonly("ids", &HostRoute::ids)
      .def_readonly("prob_sums", &HostRoute::prob_sums)
      .def_readonly("first_counts", &HostRoute::first_counts)
      .def_readonly("z_sums", &HostRoute::z_sums);
  m.def("host_route", &host_route, py::arg("logits"), py::arg("T"), py::arg("E"), py::arg("k"), py::arg("B"),
        py::arg("dtype"), py::arg("path") = -1);
  m.def("host_route_backward", &host_route_backward, py::arg("logits"), py::arg("ids"), py::arg("grad_weights"),
        py::arg("grad_prob_sums"), py::arg("grad_z_sums"), py::arg("T"), py::arg("E"), py::arg("k"), py::arg("B"),
        py::arg("dtype"), py::arg("path") = -1);
  m.def("host_topk", &host_topk, py::arg("scores"), py::arg("k"));
  m.def("host_rank_key", &host_rank_key, py::arg("score"), py::arg("id"));
  m.def("host_ranks_before", &host_ranks_before, py::arg("a"), py::arg("ia"), py::arg("b"), py::arg("ib"));
  m.def("host_permute_plan", &host_permute_plan, py::arg("ids"), py::arg("E"), py::arg("chunk"));
  m.def("host_tile_schedule", &host_tile_schedule, py::arg("offsets"), py::arg("bm"), py::arg("M") = -1);
  m.def("host_find_tile_expert", &host_find_tile_expert, py::arg("tiles"), py::arg("tile"));
  m.def("host_compact_problems", &host_compact_problems, py::arg("offsets"), py::arg("M") = -1);
  m.def("host_problem_list", &host_problem_list, py::arg("kind"), py::arg("offsets"), py::arg("K"), py::arg("N"),
        py::arg("M") = -1);
  m.def("host_aligned16", &host_aligned16, py::arg("address"), py::arg("row_elems"), py::arg("elem_bytes"));
  m.def("host_list_layout", &host_list_layout, py::arg("base"), py::arg("E"), py::arg("width"), py::arg("shape"),
        py::arg("stride_a"), py::arg("stride_b"), py::arg("stride_d"), py::arg("elem"));
  m.def("host_list_workspace_bytes", &host_list_workspace_bytes, py::arg("E"), py::arg("width"), py::arg("shape"),
        py::arg("stride_a"), py::arg("stride_b"), py::arg("stride_d"), py::arg("elem"), py::arg("after"));
  m.def("host_problem_bytes", &host_problem_bytes);
  m.def("host_round_to", &host_round_to, py::arg("v"), py::arg("dtype"));
  m.def("host_activation", &host_activation, py::arg("v"), py::arg("act"), py::arg("derivative"));
  m.def("host_act_bias_grad", &host_act_bias_grad, py::arg("grad_y"), py::arg("pre"), py::arg("offsets"),
        py::arg("N"), py::arg("act"), py::arg("dtype"));
}
