"""Graph breaks of Wan's VAE under dynamo, stock diffusers vs patched by attnpatch (any device).

    python3 benchmarks/wan_vae_graph_breaks.py

Builds a tiny AutoencoderKLWan (random weights), runs ``torch._dynamo.explain`` on the stock model
and on the same model patched with ``attnpatch.apply(model, backend="sdpa")``, and prints the graph
break count and reasons of each.  A break that stock diffusers has too is not attnpatch's.
"""
from __future__ import annotations

import torch


def main() -> None:
    import diffusers
    import torch._dynamo as dynamo

    import attnpatch

    torch.manual_seed(0)
    m = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                   temperal_downsample=[True], latents_mean=[0.0] * 4,
                                   latents_std=[1.0] * 4).eval()
    x = torch.randn(1, 3, 5, 16, 16)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    for label in ("stock", "attnpatch sdpa"):
        patch = attnpatch.apply(m, backend="sdpa", recipe=False) if label != "stock" else None
        dynamo.reset()
        with torch.no_grad():
            ex = dynamo.explain(m)(sample=x, return_dict=False)
        print(f"{label}: {ex.graph_break_count} graph breaks")
        for r in ex.break_reasons[:5]:
            print("   ", str(r.reason).splitlines()[0][:300])
            for fr in r.user_stack[-2:]:
                print("      at", fr.filename.split("site-packages/")[-1], fr.lineno, fr.name)
        if patch is not None:
            patch.remove()


if __name__ == "__main__":
    main()
