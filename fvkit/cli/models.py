"""``fvkit specs``, ``fvkit resolve`` and ``fvkit export-model``.

    fvkit specs
    fvkit resolve --model tiny-llama
    fvkit resolve --model ./my-checkpoint --model-spec llama      # or --model_spec, the old script's spelling
    fvkit export-model tiny-gptj /tmp/tiny-gpt-j

``resolve`` is the check to run before pointing fvkit at a new model: it loads
the model, resolves every layer's block, attention and out-projection, runs the
hook smoke pass of :mod:`fvkit.models.hook_check` (every hook fires once, every
out-projection reads ``n_heads * head_dim`` features; the parity gate M5 runs the
same pass) and fails unless the tokenizer follows the spec's BOS policy
(:mod:`fvkit.models.bos_policy`, which ``fvkit run`` and M5 check too).
"""

from __future__ import annotations

import argparse

from fvkit.models import zoo
from fvkit.models.bos_policy import check_bos_policy
from fvkit.models.loader import DTYPES, QUANTS, LoadedModel, load_model
from fvkit.models.hook_check import HOOK_CHECK_PROMPT, check_forward_hooks
from fvkit.models.spec import all_specs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("specs", help="list the registered model specs")
    p.set_defaults(func=cmd_specs)

    p = subparsers.add_parser(
        "resolve", help="load a model and check that its spec resolves and hooks fire on every layer")
    p.add_argument("--model", required=True, help="zoo alias, local checkpoint directory or hub id")
    p.add_argument("--model-spec", "--model_spec", dest="model_spec", default=None,
                   help="registered spec name, as `fvkit specs` lists them (default: chosen from the model)")
    add_device_args(p)
    p.set_defaults(func=cmd_resolve)

    p = subparsers.add_parser("export-model", help="write a zoo model to a directory any program can load")
    p.add_argument("name", help=f"zoo alias: {', '.join(zoo.aliases())}")
    p.add_argument("directory", help="new or empty directory to write")
    p.set_defaults(func=cmd_export)


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device/--dtype/--quant/--no-parity``, shared by commands that load models."""
    parser.add_argument("--device", default="cpu", help="torch device; parity needs cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights dtype; parity needs fp32")
    parser.add_argument("--quant", default="none", choices=list(QUANTS), help="quantization; parity needs none")
    parser.add_argument("--no-parity", dest="parity", action="store_false",
                        help="allow settings under which results differ from the reference")


def specs_table() -> str:
    rows = [("name", "blocks", "attention", "out-proj", "final norm", "lm head", "BOS", "architectures")]
    for spec in all_specs():
        bos = "tokenizer adds" if spec.prepend_bos else f"text {spec.bos_text!r}"
        rows.append((spec.name, spec.blocks_path, spec.attn_path_in_block, spec.out_proj_path_in_attn,
                     spec.final_norm_path, spec.lm_head_path, bos,
                     ", ".join(spec.architectures) or "(by model id)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_specs(args) -> int:
    print(specs_table())
    return 0


def check_hooks(lm: LoadedModel, prompt: str = HOOK_CHECK_PROMPT) -> dict:
    """The hook smoke pass (:mod:`fvkit.models.hook_check`); ``{"tokens": n, "hooks": n}`` for the report."""
    seen = check_forward_hooks(lm, prompt)
    return {"tokens": seen.n_tokens, "hooks": seen.n_hooks}


def cmd_resolve(args) -> int:
    lm = load_model(args.model, model_spec=args.model_spec, device=args.device,
                    dtype=args.dtype, quant=args.quant, parity=args.parity)
    check_bos_policy(lm)
    fired = check_hooks(lm)
    print(lm.diagnostics_table())
    print()
    print(f"OK: {lm.dims.n_layers} blocks, attention modules and out-projections resolved; "
          f"{fired['hooks']} hooks fired on a {fired['tokens']}-token prompt; out-projections read "
          f"{lm.dims.n_heads}x{lm.dims.head_dim} = {lm.dims.attn_width} features")
    return 0


def cmd_export(args) -> int:
    path = zoo.export_model(args.name, args.directory)
    print(f"exported {args.name} to {path} (load it with AutoModelForCausalLM/AutoTokenizer"
          f".from_pretrained)")
    return 0

