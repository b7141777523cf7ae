// Dynamic loss scaling for fp16 autocast. fp16 keeps about 5 significant bits below 2^-14, so small gradients
// underflow to zero; the loss is multiplied by a large scale before backward, gradients are divided by it again
// before clipping and the optimizer step, a step whose gradients overflowed is skipped and the scale shrinks,
// and after `growth_interval` good steps in a row it grows again. bf16 has fp32's range and needs none of this.
#pragma once
#include <cstdint>

namespace emt {

struct GradScalerOptions {
  double init_scale = 65536.0;  // 2^16
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  double min_scale = 1.0;       // overflowing at this scale is not an fp16 range problem any more
};

class GradScaler {
 public:
  explicit GradScaler(GradScalerOptions o = {});
  double scale() const { return scale_; }
  int64_t good_steps() const { return good_; }
  // Called once per optimizer step with whether the (scaled) gradients were finite. Returns true when the step
  // may be applied; false when it must be skipped (the scale has then been reduced).
  bool update(bool grads_finite);
  // True once an overflow happened at min_scale: the gradients are not finite at any scale (a real divergence).
  bool exhausted() const { return exhausted_; }
  void restore(double scale, int64_t good_steps);  // from a checkpoint

 private:
  GradScalerOptions o_;
  double scale_;
  int64_t good_ = 0;
  bool exhausted_ = false;
};

}  // namespace emt
