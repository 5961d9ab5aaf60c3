"""The decoder step of the default model with its 4-bit scales read as float16 pairs, and with them read
from the float32 copies, alternating in one process (the same kernels and KV cache; outputs are equal bit for bit).

    python docs/bench/step-kernels-zen5/half_scales_ab.py

Prints the median time of a step of q tokens over a context of c tokens, per mode, and their ratio.
"""
import statistics
import time

import torch

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader.gguf import default_gguf_path, load_gguf
from mtpserve.engine.spec import calibrate
from mtpserve.kernels.cpu_blocks import BlockLinear
from mtpserve.kernels.cpu_decoder import FusedDecoder

engine = LLMEngine(load_gguf(default_gguf_path(), quantized=True), EngineConfig(quantization="int4", spec_draft_n_max=0))
runner, model = engine.runner, engine.model
decoders = {"float16 pairs": FusedDecoder(model.layers, model.config, model.cos, model.sin, runner.kv_caches)}
for module in model.modules():
    if isinstance(module, BlockLinear) and module.bits == 4:  # the layers' projections
        module.half_scales = None
        module._struct = None
decoders["float32"] = FusedDecoder(model.layers, model.config, model.cos, model.sin, runner.kv_caches)
cases = [(128, 1), (128, 4), (1024, 1), (1024, 4)]
times = {}
with torch.inference_mode():
    for _ in range(12):
        for context, q in cases:
            calibrate.CONTEXT = context
            meta, positions = calibrate._metadata(runner, 1, q, runner.device)
            x = torch.randn(q, model.config.hidden_size)
            for name, decoder in decoders.items():
                for i in range(8):
                    y = x.clone()
                    start = time.perf_counter()
                    decoder.run(y, positions, meta)
                    if i >= 2:
                        times.setdefault((context, q, name), []).append(time.perf_counter() - start)
for context, q in cases:
    half = statistics.median(times[context, q, "float16 pairs"])
    full = statistics.median(times[context, q, "float32"])
    print(f"context {context}, {q} tokens: float32 {1000 * full:.2f} ms, float16 pairs {1000 * half:.2f} ms, "
          f"ratio {half / full:.3f}")
