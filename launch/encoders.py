"""List the alignment encoders: what each computes (as the iREPA release) and whether weights are here.

    python launch/encoders.py list                 # every encoder, one row each
    python launch/encoders.py list --present       # only those that can run now
    python launch/encoders.py info dinov2-vit-b    # one encoder as JSON
    python launch/encoders.py table --markdown     # the encoder table of docs/encoders.md
    python launch/encoders.py check hog --resolution 256 [--tiny]   # build + one forward
"""
from __future__ import annotations

import json


from irepa import encoders


def list_encoders(present: bool = False, as_json: bool = False) -> None:
    rows = [r for r in encoders.infos() if r["weights_present"] or not present]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'name':34s} {'dim':>5s} {'input':>5s} {'resize':16s} {'normalization':13s} {'pos embed':9s} "
          f"{'final':5s} {'weights':8s} location / source")
    for r in rows:
        state = "n/a" if not r["needs_weights"] else ("yes" if r["weights_present"] else "missing")
        where = r["weights_path"] or r["source"] or "-"
        print(f"{r['name']:34s} {r['dim']:5d} {r['input']:5d} {r['resize']:16s} {r['normalization']:13s} "
              f"{r['pos_embed']:9s} {r['final_norm']:5s} {state:8s} {where}")
    missing = sum(1 for r in rows if r["needs_weights"] and not r["weights_present"])
    if missing:
        print(f"\n{missing} encoder(s) lack weights; put them under $IREPA_ENCODER_DIR/<name> "
              f"(now {encoders.base.encoder_dir()}), the Hugging Face cache, or point "
              f"$IREPA_ENCODER_<NAME> at them.")


def table(markdown: bool = False) -> None:
    """The registry's preprocessing table (docs/encoders.md holds the --markdown form)."""
    if markdown:
        print(encoders.table_markdown(), end="")
        return
    rows = encoders.table()
    cols = encoders.TABLE_COLUMNS
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(f"{c:{width[c]}s}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r[c]):{width[c]}s}" for c in cols))


def info(name: str) -> None:
    print(json.dumps(encoders.info(name), indent=1))


def check(name: str, resolution: int = 256, batch: int = 2, tiny: bool = False, device: str = "cpu") -> None:
    import torch

    enc = encoders.build(name, tiny=tiny, device=device)
    y = enc(torch.rand(batch, 3, resolution, resolution, device=device))
    print(f"{name}: [{batch}, 3, {resolution}, {resolution}] -> {list(y.shape)} {y.dtype}")


if __name__ == "__main__":
    from irepa.cli import run
    run({"list": list_encoders, "info": info, "table": table, "check": check}, "encoders.py")
