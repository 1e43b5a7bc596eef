// Small fused CPU ops (RMSNorm + residual, rotary embedding, SiLU-and-mul).
// At decode batch sizes each is a few thousand elements: one pass here replaces
// five to eight separately dispatched torch ops. Rounding follows kernels/reference.py
// (intermediates rounded to the activation dtype where the reference rounds them).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }

}  // namespace

std::vector<torch::Tensor> rms_norm_cpu(torch::Tensor x, torch::Tensor weight, double eps,
                                        c10::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, H] with contiguous rows");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be contiguous [H]");
  const int64_t t = x.size(0), h = x.size(1);
  auto out = torch::empty({t, h}, x.options());
  torch::Tensor sum;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1 &&
                    residual->scalar_type() == x.scalar_type(),
                "residual must match x");
    sum = torch::empty({t, h}, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* rp = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = residual.has_value() ? sum.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0), rs = residual.has_value() ? residual->stride(0) : 0;
    at::parallel_for(0, t, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(h);
      for (int64_t r = begin; r < end; ++r) {
        float ss = 0.f;
        for (int64_t i = 0; i < h; ++i) {
          float v = static_cast<float>(xp[r * xs + i]);
          if (rp != nullptr) {
            const scalar_t s = round_to<scalar_t>(v + static_cast<float>(rp[r * rs + i]));
            sp[r * h + i] = s;
            v = static_cast<float>(s);
          }
          buf[i] = v;
          ss += v * v;
        }
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
        for (int64_t i = 0; i < h; ++i) {
          const float normed = static_cast<float>(round_to<scalar_t>(buf[i] * inv));
          op[r * h + i] = round_to<scalar_t>(static_cast<float>(wp[i]) * normed);
        }
      }
    });
  });
  if (residual.has_value()) return {out, sum};
  return {out};
}

// Neox-style rope on the first rot_dim dims of each head; returns new contiguous tensors.
std::vector<torch::Tensor> rotary_neox_cpu(torch::Tensor positions, torch::Tensor query,
                                           torch::Tensor key, torch::Tensor cos_sin,
                                           int64_t head_dim) {
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous(),
              "positions must be contiguous int64");
  TORCH_CHECK(cos_sin.scalar_type() == torch::kFloat32 && cos_sin.is_contiguous(),
              "cos_sin cache must be contiguous float32");
  const int64_t t = positions.size(0), rot = cos_sin.size(1), half = rot / 2;
  std::vector<torch::Tensor> outs;
  for (auto x : {query, key}) {
    TORCH_CHECK(x.size(0) == t, "query/key rows must match positions");
    auto x2 = x.reshape({t, -1});
    TORCH_CHECK(x2.stride(1) == 1 && x2.size(1) % head_dim == 0, "bad query/key layout");
    const int64_t heads = x2.size(1) / head_dim;
    auto out = torch::empty({t, x2.size(1)}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
      const scalar_t* xp = x2.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const int64_t* pp = positions.data_ptr<int64_t>();
      const float* cp = cos_sin.data_ptr<float>();
      const int64_t xs = x2.stride(0), os = out.stride(0);
      at::parallel_for(0, t, 8, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float* cosp = cp + pp[r] * rot;
          const float* sinp = cosp + half;
          for (int64_t hd = 0; hd < heads; ++hd) {
            const scalar_t* in = xp + r * xs + hd * head_dim;
            scalar_t* o = op + r * os + hd * head_dim;
            for (int64_t i = 0; i < half; ++i) {
              const float x1 = static_cast<float>(in[i]), x2v = static_cast<float>(in[i + half]);
              o[i] = static_cast<scalar_t>(x1 * cosp[i] - x2v * sinp[i]);
              o[i + half] = static_cast<scalar_t>(x2v * cosp[i] + x1 * sinp[i]);
            }
            for (int64_t i = rot; i < head_dim; ++i) o[i] = in[i];
          }
        }
      });
    });
    outs.push_back(out.view(x.sizes()));
  }
  return outs;
}

torch::Tensor silu_and_mul_cpu(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
              "x must be [T, 2 * I] with contiguous rows");
  const int64_t t = x.size(0), n = x.size(1) / 2;
  auto out = torch::empty({t, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, t, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < n; ++i) {
          const float g = static_cast<float>(xp[r * xs + i]);
          // Reference: silu(gate) is rounded to the dtype before the multiply.
          const float s = static_cast<float>(static_cast<scalar_t>(g / (1.f + std::exp(-g))));
          op[r * n + i] = static_cast<scalar_t>(s * static_cast<float>(xp[r * xs + n + i]));
        }
      }
    });
  });
  return out;
}
