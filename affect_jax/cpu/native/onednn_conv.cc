// 2-D convolutions on the CPU through oneDNN, as XLA FFI handlers.
//
// Why: XLA:CPU runs convolutions on Eigen (or YNNPACK), whose forward passes and input
// gradients are 1.1-2x slower than oneDNN's on this network's maps, and whose kernel
// gradients need transposes of the activations (docs/PERFORMANCE.md).
//
// Activations are NHWC and kernels HWIO (flax's layouts), float32, no dilation, no
// bias. Three handlers: forward, input gradient ("backward data") and kernel gradient
// ("backward weights"). oneDNN picks its own blocked kernel layout; the kernel is
// reordered to it (or, for the kernel gradient, from it) on every call: kernels are
// small next to the activations. Primitives are built once per shape and kept for the
// life of the process. affect_jax/onednn_conv.py builds and registers this file.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum class Kind : int { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

// Input [n, h, w, c], kernel [kh, kw, c, o], output [n, oh, ow, o], strides and
// paddings (top, bottom, left, right).
struct ConvShape {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  auto Tie() const {
    return std::tie(n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr);
  }
  bool operator<(const ConvShape& other) const { return Tie() < other.Tie(); }
};

#define RETURN_IF_DNNL_ERROR(expr)                                           \
  do {                                                                       \
    dnnl_status_t status_ = (expr);                                          \
    if (status_ != dnnl_success)                                             \
      return std::string(#expr) + " returned dnnl_status_t " +               \
             std::to_string(static_cast<int>(status_));                      \
  } while (0)

#define RETURN_IF_ERROR(expr)                 \
  do {                                        \
    std::string error_ = (expr);              \
    if (!error_.empty()) return error_;       \
  } while (0)

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t created = nullptr;
    dnnl_engine_create(&created, dnnl_cpu, 0);
    return created;
  }();
  return engine;
}

// One convolution of one shape and kind: its primitive and the reorder of the kernel
// between HWIO and the primitive's own layout (none when they agree).
struct Plan {
  dnnl_memory_desc_t first_md = nullptr;   // x (forward, kernel grad) or dy (input grad)
  dnnl_memory_desc_t second_md = nullptr;  // y (forward), dx (input grad), dy (kernel grad)
  dnnl_memory_desc_t kernel_hwio_md = nullptr;
  const_dnnl_memory_desc_t kernel_own_md = nullptr;
  const_dnnl_memory_desc_t scratchpad_md = nullptr;
  dnnl_primitive_t conv = nullptr;
  dnnl_primitive_t reorder = nullptr;
  const_dnnl_memory_desc_t reorder_scratchpad_md = nullptr;
  size_t kernel_own_bytes = 0;
  size_t scratchpad_bytes = 0;
  size_t reorder_scratchpad_bytes = 0;
};

// Scratchpad bytes of a primitive created in user scratchpad mode.
size_t ScratchpadBytes(const_dnnl_primitive_desc_t pd, const_dnnl_memory_desc_t* md) {
  *md = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
  return *md ? dnnl_memory_desc_get_size(*md) : 0;
}

std::string BuildPlan(Kind kind, const ConvShape& s, Plan* plan) {
  dnnl_dims_t x_dims = {s.n, s.c, s.h, s.w};  // oneDNN's logical order is NCHW / OIHW
  dnnl_dims_t y_dims = {s.n, s.o, s.oh, s.ow};
  dnnl_dims_t kernel_dims = {s.o, s.c, s.kh, s.kw};
  dnnl_dims_t strides = {s.sh, s.sw};
  dnnl_dims_t dilates = {0, 0};
  dnnl_dims_t pad_l = {s.pt, s.pl};
  dnnl_dims_t pad_r = {s.pb, s.pr};
  dnnl_memory_desc_t x_md, y_md, kernel_any_md;  // x_md, y_md live on in the plan
  RETURN_IF_DNNL_ERROR(dnnl_memory_desc_create_with_tag(&x_md, 4, x_dims, dnnl_f32, dnnl_nhwc));
  RETURN_IF_DNNL_ERROR(dnnl_memory_desc_create_with_tag(&y_md, 4, y_dims, dnnl_f32, dnnl_nhwc));
  RETURN_IF_DNNL_ERROR(dnnl_memory_desc_create_with_tag(&kernel_any_md, 4, kernel_dims,
                                                        dnnl_f32, dnnl_format_tag_any));
  RETURN_IF_DNNL_ERROR(dnnl_memory_desc_create_with_tag(&plan->kernel_hwio_md, 4, kernel_dims,
                                                        dnnl_f32, dnnl_hwio));
  dnnl_primitive_attr_t attr;
  RETURN_IF_DNNL_ERROR(dnnl_primitive_attr_create(&attr));
  // The caller's thread-local buffer is the scratchpad: no allocation per call.
  RETURN_IF_DNNL_ERROR(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
  dnnl_engine_t engine = Engine();
  // The backward primitives need the forward one as a hint.
  dnnl_primitive_desc_t forward_pd, pd;
  RETURN_IF_DNNL_ERROR(dnnl_convolution_forward_primitive_desc_create(
      &forward_pd, engine, dnnl_forward_training, dnnl_convolution_direct, x_md,
      kernel_any_md, nullptr, y_md, strides, dilates, pad_l, pad_r, attr));
  dnnl_query_t kernel_query = dnnl_query_weights_md;
  if (kind == Kind::kForward) {
    pd = forward_pd;
    plan->first_md = x_md;
    plan->second_md = y_md;
  } else if (kind == Kind::kInputGrad) {
    RETURN_IF_DNNL_ERROR(dnnl_convolution_backward_data_primitive_desc_create(
        &pd, engine, dnnl_convolution_direct, x_md, kernel_any_md, y_md, strides,
        dilates, pad_l, pad_r, forward_pd, attr));
    plan->first_md = y_md;
    plan->second_md = x_md;
  } else {
    RETURN_IF_DNNL_ERROR(dnnl_convolution_backward_weights_primitive_desc_create(
        &pd, engine, dnnl_convolution_direct, x_md, kernel_any_md, nullptr, y_md,
        strides, dilates, pad_l, pad_r, forward_pd, attr));
    plan->first_md = x_md;
    plan->second_md = y_md;
    kernel_query = dnnl_query_diff_weights_md;
  }
  // Memory descriptors queried from a primitive descriptor belong to it: pd and
  // reorder_pd stay alive with the plan (plans are never freed).
  plan->kernel_own_md = dnnl_primitive_desc_query_md(pd, kernel_query, 0);
  plan->kernel_own_bytes = dnnl_memory_desc_get_size(plan->kernel_own_md);
  plan->scratchpad_bytes = ScratchpadBytes(pd, &plan->scratchpad_md);
  RETURN_IF_DNNL_ERROR(dnnl_primitive_create(&plan->conv, pd));
  if (!dnnl_memory_desc_equal(plan->kernel_own_md, plan->kernel_hwio_md)) {
    bool to_hwio = kind == Kind::kKernelGrad;
    dnnl_primitive_desc_t reorder_pd;
    RETURN_IF_DNNL_ERROR(dnnl_reorder_primitive_desc_create(
        &reorder_pd, to_hwio ? plan->kernel_own_md : plan->kernel_hwio_md, engine,
        to_hwio ? plan->kernel_hwio_md : plan->kernel_own_md, engine, attr));
    plan->reorder_scratchpad_bytes =
        ScratchpadBytes(reorder_pd, &plan->reorder_scratchpad_md);
    RETURN_IF_DNNL_ERROR(dnnl_primitive_create(&plan->reorder, reorder_pd));
  }
  if (forward_pd != pd) dnnl_primitive_desc_destroy(forward_pd);
  dnnl_memory_desc_destroy(kernel_any_md);
  dnnl_primitive_attr_destroy(attr);
  return "";
}

// The plan for (kind, shape), built on first use. Plans are never freed, so the
// returned pointer stays valid; building holds the lock, running does not.
std::string FindPlan(Kind kind, const ConvShape& s, const Plan** found) {
  // Never destroyed: XLA's threads may still run convolutions while the process exits.
  static std::mutex* mutex = new std::mutex;
  static auto* plans = new std::map<std::pair<int, ConvShape>, std::unique_ptr<Plan>>;
  std::lock_guard<std::mutex> lock(*mutex);
  auto key = std::make_pair(static_cast<int>(kind), s);
  auto it = plans->find(key);
  if (it == plans->end()) {
    auto plan = std::make_unique<Plan>();
    RETURN_IF_ERROR(BuildPlan(kind, s, plan.get()));
    it = plans->emplace(key, std::move(plan)).first;
  }
  *found = it->second.get();
  return "";
}

// A oneDNN memory object over memory owned by someone else (XLA or a thread-local
// buffer), released at the end of the scope.
class Memory {
 public:
  ~Memory() {
    if (memory_) dnnl_memory_destroy(memory_);
  }
  std::string Wrap(const_dnnl_memory_desc_t md, void* data) {
    RETURN_IF_DNNL_ERROR(dnnl_memory_create(&memory_, md, Engine(), data));
    return "";
  }
  dnnl_memory_t get() const { return memory_; }

 private:
  dnnl_memory_t memory_ = nullptr;
};

// A growing, 64-byte aligned buffer (oneDNN's kernels prefer cache-line alignment);
// one per thread for each use, so concurrent calls never share one.
class AlignedBuffer {
 public:
  ~AlignedBuffer() { std::free(data_); }
  void* Reserve(size_t bytes) {
    if (bytes > capacity_) {
      std::free(data_);
      capacity_ = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, capacity_);
      if (data_ == nullptr) capacity_ = 0;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

dnnl_stream_t ThreadStream() {
  thread_local dnnl_stream_t stream = [] {
    dnnl_stream_t created = nullptr;
    dnnl_stream_create(&created, Engine(), dnnl_stream_default_flags);
    return created;
  }();
  return stream;
}

// Runs one convolution. `first` and `second` are the activations in the plan's order
// (forward: x, y; input grad: dy, dx; kernel grad: x, dy); `kernel_hwio` is read
// (forward, input grad) or written (kernel grad).
std::string Run(Kind kind, const ConvShape& s, void* first, void* second,
                void* kernel_hwio) {
  const Plan* plan = nullptr;
  RETURN_IF_ERROR(FindPlan(kind, s, &plan));
  thread_local AlignedBuffer kernel_buffer, scratchpad_buffer, reorder_scratchpad_buffer;
  void* kernel_own = plan->reorder ? kernel_buffer.Reserve(plan->kernel_own_bytes)
                                   : kernel_hwio;
  void* scratchpad = scratchpad_buffer.Reserve(plan->scratchpad_bytes);
  void* reorder_scratchpad =
      reorder_scratchpad_buffer.Reserve(plan->reorder_scratchpad_bytes);
  if ((plan->reorder && plan->kernel_own_bytes && !kernel_own) ||
      (plan->scratchpad_bytes && !scratchpad) ||
      (plan->reorder_scratchpad_bytes && !reorder_scratchpad))
    return "out of host memory for oneDNN's buffers";
  Memory first_mem, second_mem, kernel_mem, kernel_hwio_mem, scratchpad_mem,
      reorder_scratchpad_mem;
  RETURN_IF_ERROR(first_mem.Wrap(plan->first_md, first));
  RETURN_IF_ERROR(second_mem.Wrap(plan->second_md, second));
  RETURN_IF_ERROR(kernel_hwio_mem.Wrap(plan->kernel_hwio_md, kernel_hwio));
  RETURN_IF_ERROR(kernel_mem.Wrap(plan->kernel_own_md, kernel_own));
  std::vector<dnnl_exec_arg_t> reorder_args = {
      {DNNL_ARG_FROM, kind == Kind::kKernelGrad ? kernel_mem.get() : kernel_hwio_mem.get()},
      {DNNL_ARG_TO, kind == Kind::kKernelGrad ? kernel_hwio_mem.get() : kernel_mem.get()}};
  if (plan->reorder_scratchpad_bytes) {
    RETURN_IF_ERROR(reorder_scratchpad_mem.Wrap(plan->reorder_scratchpad_md,
                                                reorder_scratchpad));
    reorder_args.push_back({DNNL_ARG_SCRATCHPAD, reorder_scratchpad_mem.get()});
  }
  dnnl_stream_t stream = ThreadStream();
  if (plan->reorder && kind != Kind::kKernelGrad) {
    RETURN_IF_DNNL_ERROR(dnnl_primitive_execute(
        plan->reorder, stream, static_cast<int>(reorder_args.size()), reorder_args.data()));
  }
  std::vector<dnnl_exec_arg_t> args;
  if (kind == Kind::kForward) {
    args = {{DNNL_ARG_SRC, first_mem.get()}, {DNNL_ARG_WEIGHTS, kernel_mem.get()},
            {DNNL_ARG_DST, second_mem.get()}};
  } else if (kind == Kind::kInputGrad) {
    args = {{DNNL_ARG_DIFF_DST, first_mem.get()}, {DNNL_ARG_WEIGHTS, kernel_mem.get()},
            {DNNL_ARG_DIFF_SRC, second_mem.get()}};
  } else {
    args = {{DNNL_ARG_SRC, first_mem.get()}, {DNNL_ARG_DIFF_DST, second_mem.get()},
            {DNNL_ARG_DIFF_WEIGHTS, kernel_mem.get()}};
  }
  if (plan->scratchpad_bytes) {
    RETURN_IF_ERROR(scratchpad_mem.Wrap(plan->scratchpad_md, scratchpad));
    args.push_back({DNNL_ARG_SCRATCHPAD, scratchpad_mem.get()});
  }
  RETURN_IF_DNNL_ERROR(dnnl_primitive_execute(plan->conv, stream,
                                              static_cast<int>(args.size()), args.data()));
  if (plan->reorder && kind == Kind::kKernelGrad) {
    RETURN_IF_DNNL_ERROR(dnnl_primitive_execute(
        plan->reorder, stream, static_cast<int>(reorder_args.size()), reorder_args.data()));
  }
  RETURN_IF_DNNL_ERROR(dnnl_stream_wait(stream));
  return "";
}

ffi::Error ToFfiError(const std::string& error) {
  if (error.empty()) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN convolution: " + error);
}

ConvShape MakeShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                    ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                    int64_t pb, int64_t pl, int64_t pr) {
  return ConvShape{x[0], x[1], x[2], x[3], kernel[0], kernel[1], kernel[3], y[1], y[2],
                   sh, sw, pt, pb, pl, pr};
}

// Empty when input, kernel and output shapes form one convolution; else why not (the
// handlers would otherwise read or write out of bounds).
std::string CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                        ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  if (sh < 1 || sw < 1 || pt < 0 || pb < 0 || pl < 0 || pr < 0) return "bad strides or padding";
  if (kernel[2] != x[3]) return "kernel input features differ from the input's channels";
  if (y[0] != x[0] || y[3] != kernel[3]) return "output batch or features do not match";
  if (y[1] != (x[1] + pt + pb - kernel[0]) / sh + 1 ||
      y[2] != (x[2] + pl + pr - kernel[1]) / sw + 1 || y[1] < 1 || y[2] < 1)
    return "output size does not match input, kernel, strides and padding";
  return "";
}

ffi::Error InvalidShapes(const std::string& why) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "oneDNN convolution: " + why);
}

using F32 = ffi::Buffer<ffi::F32, 4>;
using F32Result = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error Forward(F32 x, F32 kernel, F32Result y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr) {
  std::string invalid = CheckShapes(x.dimensions(), kernel.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
  if (!invalid.empty()) return InvalidShapes(invalid);
  ConvShape s = MakeShape(x.dimensions(), kernel.dimensions(), y->dimensions(), sh, sw,
                          pt, pb, pl, pr);
  return ToFfiError(Run(Kind::kForward, s, x.untyped_data(), y->untyped_data(),
                        kernel.untyped_data()));
}

ffi::Error InputGrad(F32 dy, F32 kernel, F32Result dx, int64_t sh, int64_t sw,
                     int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  std::string invalid = CheckShapes(dx->dimensions(), kernel.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  if (!invalid.empty()) return InvalidShapes(invalid);
  ConvShape s = MakeShape(dx->dimensions(), kernel.dimensions(), dy.dimensions(), sh, sw,
                          pt, pb, pl, pr);
  return ToFfiError(Run(Kind::kInputGrad, s, dy.untyped_data(), dx->untyped_data(),
                        kernel.untyped_data()));
}

ffi::Error KernelGrad(F32 x, F32 dy, F32Result dkernel, int64_t sh, int64_t sw,
                      int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  std::string invalid = CheckShapes(x.dimensions(), dkernel->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  if (!invalid.empty()) return InvalidShapes(invalid);
  ConvShape s = MakeShape(x.dimensions(), dkernel->dimensions(), dy.dimensions(), sh, sw,
                          pt, pb, pl, pr);
  return ToFfiError(Run(Kind::kKernelGrad, s, x.untyped_data(), dy.untyped_data(),
                        dkernel->untyped_data()));
}

}  // namespace

// Every handler: two rank-4 float32 operands, one result, strides and paddings.
#define AFFECT_CONV_BINDING         \
  ffi::Ffi::Bind()                  \
      .Arg<F32>()                   \
      .Arg<F32>()                   \
      .Ret<F32>()                   \
      .Attr<int64_t>("stride_h")    \
      .Attr<int64_t>("stride_w")    \
      .Attr<int64_t>("pad_top")     \
      .Attr<int64_t>("pad_bottom")  \
      .Attr<int64_t>("pad_left")    \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectOnednnConvForward, Forward, AFFECT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectOnednnConvInputGrad, InputGrad, AFFECT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectOnednnConvKernelGrad, KernelGrad, AFFECT_CONV_BINDING);
