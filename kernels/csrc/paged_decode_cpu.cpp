// Paged decode attention for the CPU: one query token per sequence, K/V read straight
// from the block-paged cache (no gather copy), online softmax in fp32.
// Exposed with the other CPU ops in cpu_ops.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// One work item is a sequence and a range of its KV heads. With enough sequences an item
// takes all heads, so every block is read as one contiguous stream (K then V); with few
// sequences heads are split to keep every thread busy.
template <typename T>
void decode_kernel(const T* __restrict q, const T* __restrict kc, const T* __restrict vc,
                   T* __restrict out, const int32_t* __restrict block_tables,
                   const int32_t* __restrict seq_lens, int64_t num_seqs, int64_t num_q_heads,
                   int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                   int64_t max_blocks, float scale, int64_t window) {
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t d = head_dim;
  const int64_t token_stride = num_kv_heads * d;
  const int64_t block_stride = block_size * token_stride;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = num_seqs >= 4 * threads ? 1 : num_kv_heads;
  const int64_t heads_per_item = num_kv_heads / chunks;
  at::parallel_for(0, num_seqs * chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t nq = heads_per_item * group;  // query heads in one item
    std::vector<float> qf(nq * d), acc(nq * d), scores(nq * block_size), mx(nq), denom(nq);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks;
      const int64_t h0 = (item % chunks) * heads_per_item;
      const int64_t len = seq_lens[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const T* qbase = q + (r * num_q_heads + h0 * group) * d;
      for (int64_t i = 0; i < nq * d; ++i) qf[i] = static_cast<float>(qbase[i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      std::fill(denom.begin(), denom.end(), 0.f);
      for (int64_t b = first / block_size; b * block_size < len; ++b) {
        const int64_t block = block_tables[r * max_blocks + b];
        const int64_t t0 = std::max(first - b * block_size, int64_t{0});
        const int64_t t1 = std::min(block_size, len - b * block_size);
        const T* kb = kc + block * block_stride + h0 * d;
        const T* vb = vc + block * block_stride + h0 * d;
        // Hardware prefetchers stop at page and block boundaries: while K of this block is
        // scored, ask for its V rows and for the next block's K rows (this item's heads).
        const T* kn = nullptr;
        if ((b + 1) * block_size < len) {
          const int64_t next = block_tables[r * max_blocks + b + 1];
          kn = kc + next * block_stride + h0 * d;
        }
        const int64_t row_bytes = heads_per_item * d * static_cast<int64_t>(sizeof(T));
        for (int64_t t = t0; t < t1; ++t) {
          const T* krow = kb + t * token_stride;
          const char* pv = reinterpret_cast<const char*>(vb + t * token_stride);
          for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(pv + off);
          if (kn != nullptr) {
            const char* pk = reinterpret_cast<const char*>(kn + t * token_stride);
            for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(pk + off);
          }
          for (int64_t j = 0; j < nq; ++j) {
            const T* k = krow + (j / group) * d;
            const float* qj = qf.data() + j * d;
            float dot = 0.f;
            for (int64_t i = 0; i < d; ++i) dot += qj[i] * static_cast<float>(k[i]);
            scores[j * block_size + t] = dot;
          }
        }
        for (int64_t j = 0; j < nq; ++j) {
          float* sj = scores.data() + j * block_size;
          float block_max = mx[j];
          for (int64_t t = t0; t < t1; ++t) block_max = std::max(block_max, sj[t]);
          // Rescale what was accumulated under the old running max.
          const float correction = std::exp(mx[j] - block_max);
          float sum = denom[j] * correction;
          float* aj = acc.data() + j * d;
          for (int64_t i = 0; i < d; ++i) aj[i] *= correction;
          for (int64_t t = t0; t < t1; ++t) {
            sj[t] = std::exp(sj[t] - block_max);
            sum += sj[t];
          }
          denom[j] = sum;
          mx[j] = block_max;
        }
        for (int64_t t = t0; t < t1; ++t) {
          const T* vrow = vb + t * token_stride;
          for (int64_t j = 0; j < nq; ++j) {
            const T* v = vrow + (j / group) * d;
            const float p = scores[j * block_size + t];
            float* aj = acc.data() + j * d;
            for (int64_t i = 0; i < d; ++i) aj[i] += p * static_cast<float>(v[i]);
          }
        }
      }
      T* obase = out + (r * num_q_heads + h0 * group) * d;
      for (int64_t j = 0; j < nq; ++j) {
        const float inv = 1.f / denom[j];
        for (int64_t i = 0; i < d; ++i) obase[j * d + i] = static_cast<T>(acc[j * d + i] * inv);
      }
    }
  });
}

}  // namespace

void paged_decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor kv_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale,
                            int64_t sliding_window) {
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous(), "query must be contiguous [N, Hq, D]");
  TORCH_CHECK(out.sizes() == query.sizes() && out.is_contiguous() &&
                  out.scalar_type() == query.scalar_type(),
              "out must be a contiguous tensor like query");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be contiguous [2, num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(kv_cache.scalar_type() == query.scalar_type(), "kv_cache dtype must match query");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kInt32 &&
                  block_tables.is_contiguous(),
              "block_tables must be contiguous int32 [N, max_blocks]");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.scalar_type() == torch::kInt32 &&
                  seq_lens.is_contiguous(),
              "seq_lens must be contiguous int32 [N]");
  const int64_t n = query.size(0), hq = query.size(1), d = query.size(2);
  const int64_t hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == d, "head_dim of query and kv_cache differ");
  TORCH_CHECK(hq % hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.size(0) >= n && seq_lens.size(0) >= n, "too few block tables/lens");
  const int64_t half = kv_cache.numel() / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
        const scalar_t* base = kv_cache.data_ptr<scalar_t>();
        decode_kernel<scalar_t>(query.data_ptr<scalar_t>(), base, base + half,
                                out.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                                seq_lens.data_ptr<int32_t>(), n, hq, hkv, d, kv_cache.size(2),
                                block_tables.size(1), static_cast<float>(scale),
                                sliding_window);
      });
}

