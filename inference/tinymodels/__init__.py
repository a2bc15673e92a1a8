"""Build and train the tiny models that Sluice serves on machines without a GPU.

The platform ships real engine code (vLLM for text, diffusers for video); these
modules make the small real checkpoints those engines load in development and tests.
Everything here runs offline, from configs and the Python standard library's source.
"""
