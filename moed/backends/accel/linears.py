"""Dense linears on the device under the precision contract: the input rounded to
BF16, the weight as published (FP8 widened to BF16 per tile, its block scale applied
per tile in FP32), FP32 accumulation and output (moed.backends.accel.tiles).

Shape legend: N tokens, in / out the linear's features.
"""
import torch

from moed.model.layers import Linear


class DeviceLinear:
    """A Linear whose weight lives on the device, as stored."""

    def __init__(self, weight, bias=None):
        self.weight = weight                 # formats.Weight [out, in] on the device
        self.bias = bias                     # [out] float32 or None

    def __call__(self, x):
        # x [N, in] -> [N, out] float32
        from moed.backends.accel.tiles import linear
        y = linear(x.to(torch.bfloat16), self.weight)
        return y if self.bias is None else y + self.bias


def install_device_linears(model):
    """Every dense Linear (each module's LINEARS) and the LM head -> DeviceLinear.
    Returns how many."""
    n = 0
    for _, _, _, module in model.linear_modules():
        for attr in module.LINEARS:
            lin = getattr(module, attr, None)
            if type(lin) is Linear:
                setattr(module, attr, DeviceLinear(lin.weight, lin.bias))
                n += 1
    if type(model.lm_head) is Linear:
        model.lm_head = DeviceLinear(model.lm_head.weight, model.lm_head.bias)
        n += 1
    return n
