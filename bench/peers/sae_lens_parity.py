"""Run with a python that has sae_lens (``SAELENS_PYTHON``): load an SAE folder written by steerscale with
SAELens' own ``SAE.load_from_disk`` and write its encode / decode outputs for the inputs given, so the caller
(tests/test_sae.py, bench/sae_steer.py --saelens) compares them with steerscale's. Everything crosses the process
boundary as safetensors.

    python sae_lens_parity.py SAE_DIR INPUTS.safetensors OUTPUTS.safetensors [SAE_DIR IN OUT ...]
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE


def main() -> None:
    import sae_lens

    args = sys.argv[1:]
    if not args or len(args) % 3:
        sys.exit("usage: sae_lens_parity.py SAE_DIR INPUTS.safetensors OUTPUTS.safetensors [...]")
    for folder, inputs, outputs in zip(args[::3], args[1::3], args[2::3]):
        sae = SAE.load_from_disk(folder, device="cpu")
        x = load_file(inputs)["x"]
        with torch.no_grad():
            f = sae.encode(x)
            recon = sae.decode(f)
        save_file({"feature_acts": f.float().contiguous(), "reconstruction": recon.float().contiguous()}, outputs)
        print(json.dumps({"sae_lens": sae_lens.__version__, "class": type(sae).__name__, "d_sae": sae.cfg.d_sae,
                          "hook_name": sae.cfg.metadata.hook_name}))


if __name__ == "__main__":
    main()
