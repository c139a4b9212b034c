"""The CUDA target: lowering table (lower.py), kiln's GPU kernels (kernels/), build options."""
