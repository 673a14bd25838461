"""Sensitivity of the loss to quantizing each weight: Fisher, Taylor terms, actual ΔF and PQI."""

from .actual import actual_delta_f, loss, path_losses
from .fisher import fisher_information
from .gradients import GradientSums, gradient_sums, grads_only_for, mean_loss_gradient, window_gradients
from .path import weight_delta, weights_on_path
from .pqi import PathNode, PQIResult, path_gradients, post_quantization_integral
from .quadrature import RULES, exact_degree, quadrature
from .taylor import first_order, fisher_second_order, second_order_hvp

__all__ = ["fisher_information", "gradient_sums", "grads_only_for", "mean_loss_gradient", "window_gradients"]
__all__ += [
    "RULES",
    "GradientSums",
    "PQIResult",
    "PathNode",
    "actual_delta_f",
    "exact_degree",
    "first_order",
    "fisher_second_order",
    "loss",
    "path_gradients",
    "path_losses",
    "post_quantization_integral",
    "quadrature",
    "second_order_hvp",
    "weight_delta",
    "weights_on_path",
]
