"""Analyses above the pipeline: the paper's sensitivity reports (Tables 1–5), which quantize a model and measure
how the loss responds, and their plots."""
