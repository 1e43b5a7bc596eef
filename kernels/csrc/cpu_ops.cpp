// Python bindings of the CPU-native ops (see kernels/cpu_native.py).
#include <torch/extension.h>

void paged_decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor kv_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale,
                            int64_t sliding_window);
std::vector<torch::Tensor> rms_norm_cpu(torch::Tensor x, torch::Tensor weight, double eps,
                                        c10::optional<torch::Tensor> residual);
std::vector<torch::Tensor> rotary_neox_cpu(torch::Tensor positions, torch::Tensor query,
                                           torch::Tensor key, torch::Tensor cos_sin,
                                           int64_t head_dim);
torch::Tensor silu_and_mul_cpu(torch::Tensor x);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention (one query token per sequence)");
  m.def("rms_norm", &rms_norm_cpu, "RMSNorm with optional fused residual add");
  m.def("rotary_neox", &rotary_neox_cpu, "Neox-style rotary embedding (out of place)");
  m.def("silu_and_mul", &silu_and_mul_cpu, "silu(gate) * up over [T, 2 * I]");
}
