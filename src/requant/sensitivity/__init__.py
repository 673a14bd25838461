"""Sensitivity of the loss to quantizing each weight: Fisher, Taylor terms, actual ΔF and PQI."""

from .fisher import fisher_information
from .gradients import grads_only_for, mean_loss_gradient, window_gradients

__all__ = ["fisher_information", "grads_only_for", "mean_loss_gradient", "window_gradients"]
