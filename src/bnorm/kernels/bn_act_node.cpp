// bnorm's autograd node for act(BN(x) + r) in training on CPU: a C++ torch::autograd
// Function around the C kernels of bn_act_native.c (linked from the library
// bnorm.kernels.native builds first), registered as the operator
// bnorm_native::bn_act_train. The forward and the backward are each one kernel call with
// no Python in between; double backward (create_graph=True) calls the operator
// bnorm_native::differentiable_backward, which bnorm.kernels.bn_act defines in Python
// (ATen's differentiable ops, which autograd differentiates again).
//
// bnorm.kernels.bn_act calls it through bnorm_native::bn_act_try (below), which checks the
// tensors and finds x's memory as (R, C, B); bn_act_train itself takes (R, C, B) from its
// caller and checks only what the kernels would otherwise read or write out of bounds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

extern "C" {
int bnorm_fwd_f32(const float *x, const float *r, float *y, int64_t R, int64_t C, int64_t B,
                  const float *w, const float *b, double eps, double slope, float *mean,
                  float *invstd, float *var, float *rm, float *rv, double alpha,
                  int skip_nonfinite, int64_t *tracked, int64_t *skipped, int nt);
int bnorm_bwd_f32(const float *dy, const float *x, const float *r, float *dx, float *dr,
                  int64_t R, int64_t C, int64_t B, const float *w, const float *b,
                  const float *mean, const float *invstd, double slope, float *dw, float *db,
                  int nt);
int bnorm_fwd_f64(const double *x, const double *r, double *y, int64_t R, int64_t C,
                  int64_t B, const double *w, const double *b, double eps, double slope,
                  double *mean, double *invstd, double *var, double *rm, double *rv,
                  double alpha, int skip_nonfinite, int64_t *tracked, int64_t *skipped,
                  int nt);
int bnorm_bwd_f64(const double *dy, const double *x, const double *r, double *dx, double *dr,
                  int64_t R, int64_t C, int64_t B, const double *w, const double *b,
                  const double *mean, const double *invstd, double slope, double *dw,
                  double *db, int nt);
}

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename T>
T *ptr(const Tensor &t) {
    return t.defined() ? t.data_ptr<T>() : nullptr;
}

int64_t *counter(const Tensor &t) { return t.defined() ? t.data_ptr<int64_t>() : nullptr; }

void failed(const char *what, int status) {
    TORCH_CHECK(status != -2, "bnorm's native batch-norm ", what,
                " could not allocate its workspace");
    TORCH_CHECK(false, "bnorm's native batch-norm ", what, ": expected a non-empty input");
}

// A (C,) parameter as the kernels read it: x's dtype, contiguous.
Tensor as_kernel_vector(const Tensor &t, const Tensor &x) {
    if (!t.defined() || (t.scalar_type() == x.scalar_type() && t.is_contiguous())) return t;
    return t.to(x.scalar_type()).contiguous();
}

// A tensor of x's shape with x's strides (the kernels walk both the same way).
Tensor with_strides_of(const Tensor &t, const Tensor &x) {
    if (!t.defined() || t.strides() == x.strides()) return t;
    return at::empty_like(x).copy_(t);
}

struct BatchNormAct : public torch::autograd::Function<BatchNormAct> {
    // (Optional tensors as std::optional: autograd takes no undefined tensor as an input.)
    static variable_list forward(AutogradContext *ctx, const Tensor &x,
                                 const std::optional<Tensor> &weight_,
                                 const std::optional<Tensor> &bias_,
                                 const std::optional<Tensor> &residual_,
                                 const std::optional<Tensor> &running_mean_,
                                 const std::optional<Tensor> &running_var_,
                                 const std::optional<Tensor> &tracked_,
                                 const std::optional<Tensor> &skipped_, int64_t R, int64_t C,
                                 int64_t B, double eps, double slope, double alpha,
                                 bool skip_nonfinite) {
        const Tensor weight = weight_.value_or(Tensor()), bias = bias_.value_or(Tensor());
        const Tensor residual = residual_.value_or(Tensor());
        const Tensor running_mean = running_mean_.value_or(Tensor());
        const Tensor running_var = running_var_.value_or(Tensor());
        const Tensor tracked = tracked_.value_or(Tensor()), skipped = skipped_.value_or(Tensor());
        // (What the kernels read and write must be there: cheap checks for a direct call.)
        TORCH_CHECK(x.device().is_cpu() && x.is_non_overlapping_and_dense(),
                    "bnorm's native batch-norm: expected a dense CPU input");
        TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "bnorm's native batch-norm: expected float32 or float64 input");
        TORCH_CHECK(R * C * B == x.numel() && R * B > 0,
                    "bnorm's native batch-norm: expected a non-empty (R, C, B) of x's size");
        for (const Tensor *t : {&weight, &bias})
            TORCH_CHECK(!t->defined() || (t->device().is_cpu() && t->numel() == C),
                        "bnorm's native batch-norm: expected (C,) CPU weight and bias");
        TORCH_CHECK(!residual.defined() || (residual.device().is_cpu() &&
                                            residual.sizes() == x.sizes() &&
                                            residual.scalar_type() == x.scalar_type()),
                    "bnorm's native batch-norm: expected a residual like x");
        TORCH_CHECK(running_mean.defined() == running_var.defined(),
                    "bnorm's native batch-norm: expected both running statistics or neither");
        for (const Tensor *t : {&running_mean, &running_var})
            TORCH_CHECK(!t->defined() || (t->device().is_cpu() && t->is_contiguous() &&
                                          t->numel() == C && t->scalar_type() == x.scalar_type()),
                        "bnorm's native batch-norm: expected contiguous (C,) running statistics "
                        "of x's dtype");
        for (const Tensor *t : {&tracked, &skipped})
            TORCH_CHECK(!t->defined() || (t->device().is_cpu() && t->numel() == 1 &&
                                          t->scalar_type() == at::kLong),
                        "bnorm's native batch-norm: expected int64 counters");
        const Tensor w = as_kernel_vector(weight, x), b = as_kernel_vector(bias, x);
        const Tensor r = with_strides_of(residual, x);
        Tensor y = at::empty_like(x);
        Tensor mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
        const int nt = at::get_num_threads();
        int status;
        if (x.scalar_type() == at::kFloat) {
            status = bnorm_fwd_f32(ptr<float>(x), ptr<float>(r), ptr<float>(y), R, C, B,
                                   ptr<float>(w), ptr<float>(b), eps, slope, ptr<float>(mean),
                                   ptr<float>(invstd), nullptr, ptr<float>(running_mean),
                                   ptr<float>(running_var), alpha, skip_nonfinite,
                                   counter(tracked), counter(skipped), nt);
        } else {
            status = bnorm_fwd_f64(ptr<double>(x), ptr<double>(r), ptr<double>(y), R, C, B,
                                   ptr<double>(w), ptr<double>(b), eps, slope,
                                   ptr<double>(mean), ptr<double>(invstd), nullptr,
                                   ptr<double>(running_mean), ptr<double>(running_var), alpha,
                                   skip_nonfinite, counter(tracked), counter(skipped), nt);
        }
        if (status < -1) failed("forward", status);
        if (running_mean.defined()) {  // written through pointers: autograd's in-place check
            running_mean.unsafeGetTensorImpl()->bump_version();
            running_var.unsafeGetTensorImpl()->bump_version();
            const Tensor &count = status == 1 ? tracked : skipped;
            if (count.defined()) count.unsafeGetTensorImpl()->bump_version();
        }
        ctx->save_for_backward({x, r, w, b, mean, invstd});
        ctx->saved_data["shape"] = std::vector<int64_t>{R, C, B};
        ctx->saved_data["slope"] = slope;
        // the parameters' own dtypes, for their gradients (-1: no parameter)
        ctx->saved_data["weight_dtype"] =
            weight.defined() ? static_cast<int64_t>(weight.scalar_type()) : int64_t(-1);
        ctx->saved_data["bias_dtype"] =
            bias.defined() ? static_cast<int64_t>(bias.scalar_type()) : int64_t(-1);
        ctx->mark_non_differentiable({mean, invstd});
        return {y, mean, invstd};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &r = saved[1], &w = saved[2], &b = saved[3];
        const Tensor &mean = saved[4], &invstd = saved[5];
        const auto shape = ctx->saved_data["shape"].toIntVector();
        const double slope = ctx->saved_data["slope"].toDouble();
        const int64_t R = shape[0], C = shape[1], B = shape[2];
        Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(x);
        Tensor dx, dw, db, dr;
        if (at::GradMode::is_enabled()) {
            // create_graph=True: ATen's differentiable ops (defined in Python)
            static auto op =
                c10::Dispatcher::singleton()
                    .findSchemaOrThrow("bnorm_native::differentiable_backward", "")
                    .typed<std::vector<Tensor>(const Tensor &, const Tensor &,
                                               const std::optional<Tensor> &,
                                               const std::optional<Tensor> &,
                                               const std::optional<Tensor> &, const Tensor &,
                                               const Tensor &, double)>();
            auto opt = [](const Tensor &t) {
                return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
            };
            auto out = op.call(dy, x, opt(r), opt(w), opt(b), mean, invstd, slope);
            dx = out[0], dw = out[1], db = out[2];
            if (r.defined()) dr = out[3];
        } else {
            dy = with_strides_of(dy, x);
            dx = at::empty_like(x);
            if (r.defined()) dr = at::empty_like(x);
            dw = at::empty({C}, x.options()), db = at::empty({C}, x.options());
            const int nt = at::get_num_threads();
            int status;
            if (x.scalar_type() == at::kFloat) {
                status = bnorm_bwd_f32(ptr<float>(dy), ptr<float>(x), ptr<float>(r),
                                       ptr<float>(dx), ptr<float>(dr), R, C, B, ptr<float>(w),
                                       ptr<float>(b), ptr<float>(mean), ptr<float>(invstd),
                                       slope, ptr<float>(dw), ptr<float>(db), nt);
            } else {
                status = bnorm_bwd_f64(ptr<double>(dy), ptr<double>(x), ptr<double>(r),
                                       ptr<double>(dx), ptr<double>(dr), R, C, B,
                                       ptr<double>(w), ptr<double>(b), ptr<double>(mean),
                                       ptr<double>(invstd), slope, ptr<double>(dw),
                                       ptr<double>(db), nt);
            }
            if (status < 0) failed("backward", status);
        }
        const int64_t wdt = ctx->saved_data["weight_dtype"].toInt();
        const int64_t bdt = ctx->saved_data["bias_dtype"].toInt();
        dw = wdt < 0 ? Tensor() : dw.to(static_cast<at::ScalarType>(wdt));
        db = bdt < 0 ? Tensor() : db.to(static_cast<at::ScalarType>(bdt));
        return {dx,       dw,       db,       dr,       Tensor(), Tensor(), Tensor(), Tensor(),
                Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

std::tuple<Tensor, Tensor, Tensor> bn_act_train(
    const Tensor &x, const std::optional<Tensor> &weight, const std::optional<Tensor> &bias,
    const std::optional<Tensor> &residual, const std::optional<Tensor> &running_mean,
    const std::optional<Tensor> &running_var, const std::optional<Tensor> &tracked,
    const std::optional<Tensor> &skipped, int64_t R, int64_t C, int64_t B, double eps,
    double slope, double alpha, bool skip_nonfinite) {
    auto out = BatchNormAct::apply(x, weight, bias, residual, running_mean, running_var, tracked,
                                   skipped, R, C, B, eps, slope, alpha, skip_nonfinite);
    return {out[0], out[1], out[2]};
}

// x's memory as R rows of C channels of B contiguous values (channels at dim 1): its dims
// by decreasing stride (ties in dim order) must lay it out contiguously. The same rule as
// bnorm.kernels.layout._Layout (its `dense`, `a` and `b`); false where it does not hold.
bool channel_blocks(const Tensor &x, int64_t &R, int64_t &B) {
    const auto sizes = x.sizes(), strides = x.strides();
    const int64_t n = x.dim();
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return strides[a] > strides[b]; });
    int64_t expected = 1;
    for (int64_t i = n - 1; i >= 0; --i) {
        const int64_t d = order[i];
        if (sizes[d] == 1) continue;
        if (strides[d] != expected) return false;
        expected *= sizes[d];
    }
    R = 1, B = 1;
    bool after = false;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t d = order[i];
        if (d == 1) after = true;
        else if (after) B *= sizes[d];
        else R *= sizes[d];
    }
    return true;
}

bool is_vector(const Tensor &t, int64_t C, at::ScalarType dtype) {
    return t.device().is_cpu() && t.dim() == 1 && t.size(0) == C && t.scalar_type() == dtype;
}

bool is_counter(const Tensor &t) {
    return t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == at::kLong;
}

// How bnorm.kernels.bn_act calls the node (its _native_node_step; native_try, the
// layers' per-call route, through it): bn_act_train where the kernels take this call's
// tensors as they are — a dense x with channels at dim 1, of float32/float64, more values
// than channels; (C,) weight and bias of x's dtype or none; a residual of x's shape and
// dtype or none; contiguous (C,) running statistics of x's dtype, or none; int64 counters
// or none; all on the CPU — and an empty list where they do not (the caller then runs the
// Python Function, or takes its general path, which decides the same call the same way).
std::vector<Tensor> bn_act_try(
    const Tensor &x, const std::optional<Tensor> &weight, const std::optional<Tensor> &bias,
    const std::optional<Tensor> &residual, const std::optional<Tensor> &running_mean,
    const std::optional<Tensor> &running_var, const std::optional<Tensor> &tracked,
    const std::optional<Tensor> &skipped, double eps, double slope, double alpha,
    bool skip_nonfinite) {
    const auto dtype = x.scalar_type();
    if (!x.device().is_cpu() || (dtype != at::kFloat && dtype != at::kDouble) || x.dim() < 2)
        return {};
    const int64_t C = x.size(1);
    if (x.numel() <= C || !x.is_non_overlapping_and_dense()) return {};
    if (running_mean.has_value() != running_var.has_value()) return {};
    for (const auto *t : {&running_mean, &running_var})
        if (*t && (!is_vector(**t, C, dtype) || !(*t)->is_contiguous())) return {};
    for (const auto *t : {&weight, &bias})
        if (*t && !is_vector(**t, C, dtype)) return {};
    if (residual && !(residual->device().is_cpu() && residual->sizes() == x.sizes() &&
                      residual->scalar_type() == dtype))
        return {};
    for (const auto *t : {&tracked, &skipped})
        if (*t && !is_counter(**t)) return {};
    int64_t R, B;
    if (!channel_blocks(x, R, B)) return {};
    auto out = BatchNormAct::apply(x, weight, bias, residual, running_mean, running_var, tracked,
                                   skipped, R, C, B, eps, slope, alpha, skip_nonfinite);
    return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY(bnorm_native, m) {
    m.def(
        "bn_act_try(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "Tensor(d!)? num_batches_skipped, float eps, float slope, float alpha, "
        "bool skip_nonfinite) -> Tensor[]",
        &bn_act_try);
    m.def(
        "bn_act_train(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "Tensor(d!)? num_batches_skipped, int R, int C, int B, float eps, float slope, "
        "float alpha, bool skip_nonfinite) -> (Tensor, Tensor, Tensor)",
        &bn_act_train);
}
