// Flash-style attention for CPU, forward and backward, as a Paddle custom op (built on first use by
// libernie/kernels/cpu_kernel.py; its Paddle-ops twin is libernie/kernels/flash.py).
//
// Shapes: q [b, s, nh, hd], k/v [b, nkv, t, hd] (head-major), fp32, dense. kend int32 [b, t]: key j may be
// seen by query rows at absolute positions p with j <= p < kend[j] (FlashMask's column form: causal,
// documents, the DPO rule and padding in one vector). Query row i sits at p = i + t - s (a KV cache holds
// the first t - s keys). out [b, s, nh, hd]; lse [b, nh, s] (log-sum-exp per row, kept for the backward).
//
// Memory is O(s * hd) per head: scores live only as [rows, BK] tiles. The backward recomputes them from
// lse (FlashAttention-2). A tile whose every key has expired before its first row (another document) or
// lies past its last row (causal) is skipped, so packed documents cost the sum of len^2, not s^2.
// One task holds every query head of a kv head (GQA), so each K/V tile is read once for all of them.
#include "paddle/extension.h"

#include "flash_attention_cpu.h"

using ernie_flash::make_shape;

std::vector<paddle::Tensor> FlashAttnForward(const paddle::Tensor& q, const paddle::Tensor& k,
                                             const paddle::Tensor& v, const paddle::Tensor& kend) {
  PD_CHECK(q.dtype() == paddle::DataType::FLOAT32 && k.dtype() == q.dtype() && v.dtype() == q.dtype(),
           "ernie_flash_attention_cpu: fp32 only");
  PD_CHECK(kend.dtype() == paddle::DataType::INT32, "ernie_flash_attention_cpu: kend must be int32");
  PD_CHECK(q.shape().size() == 4 && k.shape().size() == 4 && k.shape() == v.shape(),
           "ernie_flash_attention_cpu: q [b, s, nh, hd], k and v [b, nkv, t, hd]");
  PD_CHECK(k.shape()[0] == q.shape()[0] && k.shape()[3] == q.shape()[3] && q.shape()[2] % k.shape()[1] == 0 &&
               k.shape()[2] >= q.shape()[1] && kend.numel() == q.shape()[0] * k.shape()[2],
           "ernie_flash_attention_cpu: shapes of q, k/v and kend [b, t] disagree");
  const auto d = make_shape(q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3], k.shape()[1], k.shape()[2]);
  auto out = paddle::empty({d.b, d.s, d.nh, d.hd}, paddle::DataType::FLOAT32, q.place());
  auto lse = paddle::empty({d.b, d.nh, d.s}, paddle::DataType::FLOAT32, q.place());
  ernie_flash::forward(d, q.data<float>(), k.data<float>(), v.data<float>(), kend.data<int32_t>(),
                       out.data<float>(), lse.data<float>());
  return {out, lse};
}

std::vector<paddle::Tensor> FlashAttnBackward(const paddle::Tensor& q, const paddle::Tensor& k,
                                              const paddle::Tensor& v, const paddle::Tensor& kend,
                                              const paddle::Tensor& out, const paddle::Tensor& lse,
                                              const paddle::Tensor& dout) {
  const auto d = make_shape(q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3], k.shape()[1], k.shape()[2]);
  auto dq = paddle::full({d.b, d.s, d.nh, d.hd}, 0.0f, paddle::DataType::FLOAT32, q.place());
  auto dk = paddle::empty({d.b, d.nkv, d.t, d.hd}, paddle::DataType::FLOAT32, q.place());
  auto dv = paddle::empty({d.b, d.nkv, d.t, d.hd}, paddle::DataType::FLOAT32, q.place());
  ernie_flash::backward(d, q.data<float>(), k.data<float>(), v.data<float>(), kend.data<int32_t>(),
                        out.data<float>(), lse.data<float>(), dout.contiguous().data<float>(), dq.data<float>(),
                        dk.data<float>(), dv.data<float>());
  return {dq, dk, dv};
}

std::vector<std::vector<int64_t>> FlashAttnInferShape(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                                      const std::vector<int64_t>& v, const std::vector<int64_t>& ke) {
  return {q, {q[0], q[2], q[1]}};
}

std::vector<paddle::DataType> FlashAttnInferDtype(const paddle::DataType& q, const paddle::DataType& k,
                                                  const paddle::DataType& v, const paddle::DataType& ke) {
  return {q, q};
}

PD_BUILD_OP(ernie_flash_attention_cpu)
    .Inputs({"Q", "K", "V", "KEnd"})
    .Outputs({"Out", "LSE"})
    .SetKernelFn(PD_KERNEL(FlashAttnForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FlashAttnInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FlashAttnInferDtype));

PD_BUILD_GRAD_OP(ernie_flash_attention_cpu)
    .Inputs({"Q", "K", "V", "KEnd", "Out", "LSE", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Q"), paddle::Grad("K"), paddle::Grad("V")})
    .SetKernelFn(PD_KERNEL(FlashAttnBackward));
