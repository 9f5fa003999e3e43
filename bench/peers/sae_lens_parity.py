"""Run with a python that has sae_lens (``SAELENS_PYTHON``). Both directions of the SAELens file-format parity:

* ``SAE_DIR IN OUT`` triples: load an SAE folder written by steerscale with SAELens' own ``SAE.load_from_disk``
  and write its ``encode`` / ``decode`` outputs for the inputs ``IN["x"]`` to ``OUT``;
* ``--make DIR --inputs IN``: build random SAELens SAEs (standard, jumprelu, topk) with SAELens' own classes,
  save each with its ``save_model`` in ``DIR/<arch>/`` and write their outputs to ``DIR/<arch>.out.safetensors``,
  for steerscale's loader to read.

The caller (tests/test_sae.py) compares them with steerscale's. Everything crosses the process boundary as
safetensors; one process does all of it (importing sae_lens takes about a minute).

    python sae_lens_parity.py SAE_DIR INPUTS.safetensors OUTPUTS.safetensors [...] [--make DIR --inputs IN]
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def outputs(sae, x, path) -> None:
    with torch.no_grad():
        f = sae.encode(x)
        recon = sae.decode(f)
    save_file({"feature_acts": f.float().contiguous(), "reconstruction": recon.float().contiguous()}, str(path))


def make(folder: Path, x: torch.Tensor) -> None:
    from sae_lens import (JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE,
                          TopKSAEConfig)

    torch.manual_seed(0)
    kinds = {"standard": (StandardSAE, StandardSAEConfig, {}), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
             "topk": (TopKSAE, TopKSAEConfig, {"k": 8})}
    for arch, (cls, cfg_cls, extra) in kinds.items():
        cfg = cfg_cls(d_in=x.shape[-1], d_sae=64, **extra)
        cfg.metadata.hook_name = "blocks.1.hook_resid_post"
        cfg.metadata.model_name = "tiny"
        sae = cls(cfg)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(torch.randn_like(p).abs() * 0.3 if name == "threshold" else torch.randn_like(p) * 0.3)
        sae.save_model(folder / arch)
        outputs(sae, x, folder / f"{arch}.out.safetensors")


def main() -> None:
    import sae_lens
    from sae_lens import SAE

    ap = argparse.ArgumentParser()
    ap.add_argument("triples", nargs="*")
    ap.add_argument("--make", default=None)
    ap.add_argument("--inputs", default=None)
    args = ap.parse_args()
    if len(args.triples) % 3 or (args.make and not args.inputs):
        raise SystemExit("usage: sae_lens_parity.py [SAE_DIR IN OUT ...] [--make DIR --inputs IN]")
    t = args.triples
    for folder, inputs, out in zip(t[::3], t[1::3], t[2::3]):
        sae = SAE.load_from_disk(folder, device="cpu")
        outputs(sae, load_file(inputs)["x"], out)
        print(json.dumps({"sae_lens": sae_lens.__version__, "loaded": folder, "class": type(sae).__name__}))
    if args.make:
        make(Path(args.make), load_file(args.inputs)["x"])
        print(json.dumps({"sae_lens": sae_lens.__version__, "made": args.make}))


if __name__ == "__main__":
    main()
