// Dynamic loss scaling for fp16 training (include/emt/train/grad_scaler.h).
#include <emt/core/error.h>
#include <emt/train/grad_scaler.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace emt {

GradScaler::GradScaler(GradScalerOptions o) : o_(o), scale_(o.init_scale) {
  if (!(o.init_scale > 0) || !(o.growth_factor > 1) || !(o.backoff_factor > 0 && o.backoff_factor < 1) ||
      o.growth_interval < 1 || !(o.min_scale > 0))
    throw ConfigError("[grad_scaler] need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, "
                      "growth_interval >= 1 and min_scale > 0");
}

bool GradScaler::update(bool grads_finite) {
  if (!grads_finite) {
    exhausted_ = scale_ <= o_.min_scale;
    scale_ = std::max(o_.min_scale, scale_ * o_.backoff_factor);
    good_ = 0;
    return false;
  }
  exhausted_ = false;
  if (++good_ >= o_.growth_interval) {
    scale_ *= o_.growth_factor;
    good_ = 0;
  }
  return true;
}

void GradScaler::restore(double scale, int64_t good_steps) {
  if (!(scale > 0) || !std::isfinite(scale) || good_steps < 0)
    throw FormatError("[grad_scaler] checkpoint holds an invalid loss scale " + std::to_string(scale) +
                      " / good steps " + std::to_string(good_steps));
  scale_ = scale;
  good_ = good_steps;
  exhausted_ = false;
}

}  // namespace emt
