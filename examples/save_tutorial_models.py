"""Save the tutorial's model the three ways it shows (../shared/reference/pytorch-save-load-tutorial.md).

Writes, into the current directory: sample_model.pt (whole model), sample_model_state.pt
(parameters only), model_scripted.pt (TorchScript), tutorial_arch.json (the architecture spec
the registry needs to rebuild the model for the parameters-only file), and input.pt (an input).
"""

import json

import torch
import torch.nn as nn

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 1))
print(net)

# 1. The whole model, structure and parameters (保存整个模型).
torch.save(net, "sample_model.pt")
# 2. Parameters only, the recommended way (仅保存模型参数).
torch.save(net.state_dict(), "sample_model_state.pt")
# 3. TorchScript, for inference without the class (使用jit保存为TorchScript格式).
model_scripted = torch.jit.script(net)
model_scripted.save("model_scripted.pt")

spec = {
    "target": "torch.nn.Sequential",
    "args": [
        {"target": "torch.nn.Linear", "kwargs": {"in_features": 128, "out_features": 16, "bias": True}},
        {"target": "torch.nn.ReLU"},
        {"target": "torch.nn.Linear", "kwargs": {"in_features": 16, "out_features": 1, "bias": True}},
    ],
}
with open("tutorial_arch.json", "w") as f:
    json.dump(spec, f, indent=2)

x = torch.randn(4, 128)
torch.save({"x": x, "y": net.eval()(x).detach()}, "input.pt")
