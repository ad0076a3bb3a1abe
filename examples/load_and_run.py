"""Load every pushed version of the tutorial model through the registry and check its outputs."""

import torch

from registry import Registry

sample = torch.load("input.pt", weights_only=True)
with Registry() as reg:
    for ref in ("tutorial-full", "tutorial@production", "tutorial-scripted", "pulled.pt"):
        if ref == "pulled.pt":  # the file `registry pull` wrote: a plain state_dict, as in the tutorial
            model = torch.nn.Sequential(torch.nn.Linear(128, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
            model.load_state_dict(torch.load("pulled.pt", weights_only=True))
            model.eval()
        else:
            model = reg.load(ref)
        with torch.no_grad():
            out = model(sample["x"])
        assert torch.allclose(out, sample["y"]), ref
        print(f"{ref:<22} {type(model).__name__:<22} output {out[:, 0].tolist()}  ok")
