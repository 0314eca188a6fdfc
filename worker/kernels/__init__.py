"""Quantization kernels: the quantizers, the linear modules that run quantized weights, the
packed-weight artifact, SmoothQuant's smoothing math, and the native model assembled from them
inside IPEX's decoder graph. Which of these a tier uses, and when, is decided in
`tierserve.worker.tiers`; nothing here imports a tier.
"""
